"""The pipeline: typed configuration, run directories, the stage graph and the command line."""
