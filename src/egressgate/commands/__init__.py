"""The command-line verbs that are more than a few lines (``cli`` parses the arguments and calls
each ``main``): ``replay`` (recorded traffic under a candidate config) and ``receipt`` (check a
job receipt's signature, show the gateway's receipt key)."""
