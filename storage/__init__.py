"""LevelDB storage of the chain: blocks, the block index, state with undo data, models."""
