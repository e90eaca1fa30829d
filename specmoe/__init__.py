"""SpecMoE: MoE serving with self-assisted speculative decoding."""


def connect(address=None, spec=None):
    """A client of a SpecMoE deployment (see ``deploy.client.connect``); imports Ray only when called."""
    from deploy.client import connect as _connect

    return _connect(address, spec)
