"""Ring (full layers) and halo (sliding layers) attention against the definition in fp64 on 2 and
4 gloo ranks (tests/parallel/ring_job.py; with every point-to-point send matched to its receive in
order, size and dtype across the ranks), and the halo plan on its own."""

from pathlib import Path

import pytest

from gptoss_titan.parallel.context_parallel import CPLayout
from gptoss_titan.parallel.ring_attention import halo_plan

from ..conftest import python_cmd, run_ok

HERE = Path(__file__).parent


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [2, 4])
def test_ring_and_halo_attention_equal_the_definition(nproc):
    r = run_ok(python_cmd(nproc, str(HERE / "ring_job.py")), timeout=600)
    assert "equal the definition" in r.stdout + r.stderr
    assert "p2p sends matched" in r.stdout + r.stderr


def test_balanced_layout_and_halo_plan():
    """cp 2 over 16 tokens: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2; with window 6 each
    piece receives exactly the 5 keys before it (fewer at the start), from whoever holds them."""
    lay = CPLayout.balanced(16, 2, (6,))
    assert lay.pieces == (((0, 4), (12, 16)), ((4, 8), (8, 12)))
    assert lay.index(0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    # rank 1's pieces start at 4 and 8: they need positions 0..3 (rank 0's rows 0..3) and 3..7
    send_rows, send_counts, recv_counts, halos = halo_plan([list(p) for p in lay.pieces], 6, 1)
    assert recv_counts == [5, 4]  # from rank 0: 0,1,2,3 and 3; from rank 1 (itself): 4,5,6,7
    assert [len(h) for h in halos] == [4, 5]
    send_rows0, send_counts0, _, halos0 = halo_plan([list(p) for p in lay.pieces], 6, 0)
    assert send_counts0 == [0, 5] and send_rows0 == [0, 1, 2, 3, 3]
    assert [len(h) for h in halos0] == [0, 5]  # piece 12..16 needs 7..11: from rank 1
    with pytest.raises(ValueError, match="not divisible by 2 x context_parallel_degree = 6"):
        CPLayout.balanced(16, 3)
