"""The Flower ClientApp: local LoRA training on a client's shard."""

from fedpeft.client.app import make_client_app

__all__ = ["make_client_app"]
