"""The tests' own S3 server starts even when a port it found free is taken before it binds it."""

import socket

import pytest

from ports import free_ports
from s3server import S3Server

pytestmark = pytest.mark.integration


def test_a_port_taken_after_it_was_found_free_costs_a_new_pick_not_the_run():
    server = S3Server()
    taken = server.ports["s3"]
    with socket.socket() as squatter:  # what another server started in between would do
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            server.start()
            assert server.ports["s3"] != taken and server.endpoint.endswith(f":{server.ports['s3']}")
            assert server.client().list_buckets()["Buckets"]
        finally:
            server.close()


def test_no_port_is_handed_out_twice_or_from_the_ephemeral_range():
    low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    ports = free_ports(40) + free_ports(40)
    assert len(set(ports)) == 80 and max(ports) < low
