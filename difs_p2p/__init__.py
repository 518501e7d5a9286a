"""DIFS-P2P: peer-to-peer object storage over a Kademlia DHT."""

__version__ = "0.1.0"
