"""An example out-of-tree qmoe backend (see `mypkg.moe`). Importing this package imports nothing else."""
