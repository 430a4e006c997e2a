"""Errors shared by the sans-IO protocol modules (AGI, AMI, later ESL)."""


class ProtocolError(ValueError):
    """The peer sent, or we were asked to send, bytes that break the wire protocol.

    Readers raise it as soon as the violation is visible, then their state is
    undefined: drop the connection rather than feeding more data.
    """
