"""Code that runs next to the kernels. Modules here import only torch (and math), because generated files
embed their source to stay independent of patterncc."""
