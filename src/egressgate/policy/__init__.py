"""Pure policy: who is this peer, may it go there, is this address safe. No I/O."""
