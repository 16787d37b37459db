"""Building blocks of ``moesaic train``: byte corpora and batch streams, typed TOML configs."""
