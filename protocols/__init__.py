"""Wire formats and codecs for cardsvc: pure (no network I/O) and independent of the service.

Modules: errors, sm (SM2/SM3/SM4/Ed25519), idnumber, card, ecard, hotlist, terminal_auth, api.
Specs are the *.md files next to the modules; test vectors are in vectors/.
"""

__all__: list[str] = []
