"""The file names of a checkpoint folder's metadata, in a module of their own so that the readers, the
preprocessing and the hub resolver can all name them without importing each other."""

CONFIG_NAME = "config.json"
PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
