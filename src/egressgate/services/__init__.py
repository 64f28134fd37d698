"""What a running gateway does in the background: attest which IP each member exits from
(``probe``), check members against providers (``checks``), fetch token keys (``keysource``),
watch the config file (``watch``), keep worker processes (``workers``) and sign job receipts
(``receiptdesk``). Above ``proxy`` and ``admin``, below ``app``, which starts them."""
