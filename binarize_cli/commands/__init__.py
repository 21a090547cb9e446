"""One module per CLI command; each only parses, calls the library and prints."""
