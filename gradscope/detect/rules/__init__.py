"""The built-in detectors, one module per fault class. Importing this package registers them."""
