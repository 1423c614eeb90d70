"""An example plugin package (README "Plugins"): ``my_pkg.bigram`` registers ``bigram``."""
