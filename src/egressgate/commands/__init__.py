"""The command-line verbs (``cli`` parses the arguments and calls each ``main``): ``verify`` (the
member x provider matrix), ``explain`` (what the gateway would decide for one request), ``demo``
(the product on loopback), ``replay`` (recorded traffic under a candidate config; its decisions
in ``replay_core``) and ``receipt`` (check a job receipt's signature, show the receipt key).
The top layer: commands may import anything, nothing imports them."""
