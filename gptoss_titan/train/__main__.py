from ..runtime.cli import exit_now
from .entry import main

exit_now(main())
