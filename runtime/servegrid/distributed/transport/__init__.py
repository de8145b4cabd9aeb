"""The TCP request plane: framed, multiplexed request/response streams between processes."""
