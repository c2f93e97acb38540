"""The Flower ServerApp and the adapter that runs fedpeft strategies inside Flower."""

from fedpeft.server.app import make_server_app, run_federation
from fedpeft.server.flower_strategy import FlowerLoRAStrategy

__all__ = ["FlowerLoRAStrategy", "make_server_app", "run_federation"]
