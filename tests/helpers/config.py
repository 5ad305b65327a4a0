"""Config files for the config tests."""


def write(tmp_path, text, name="c.toml"):
    """text as tmp_path/name; returns its path (a str, as --config takes it)."""
    p = tmp_path / name
    p.write_text(text)
    return str(p)
