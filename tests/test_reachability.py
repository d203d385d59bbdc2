"""The reachability check a peer makes at start (``peer/reachability.py``): a real coordinator dials the
asking host back at the port it names. That the check tells a host behind a NAT apart is the NAT
scenario's (``tests/test_chaos.py``): here, on one machine, the host is reachable at a port it listens
on and not at one it does not."""

from __future__ import annotations

import socket

import pytest

from peer.protocol.client import CoordinatorClient, CoordinatorError
from peer.protocol.identity import Identity
from peer.protocol.schemas import ReachBody, ReachView
from peer.reachability import check
from tests.harness import CoordinatorProcess

pytestmark = pytest.mark.timeout(60)


async def test_the_coordinator_dials_the_asking_host_back_at_the_port_it_names(
    coordinator: CoordinatorProcess,
) -> None:
    async with CoordinatorClient(coordinator.url, Identity.generate()) as client:
        with socket.socket() as listening:
            listening.bind(("127.0.0.1", 0))
            listening.listen()
            port = listening.getsockname()[1]
            answer = await client.reachability(port)
            assert (answer.address, answer.port, answer.reachable, answer.reason) == (
                "127.0.0.1",
                port,
                True,
                "connected",
            )
        closed = await client.reachability(port)  # nobody listens there any more
        assert not closed.reachable and "refused" in closed.reason.lower(), closed
        for bad in (0, 65536):  # sent as is: the server checks what any client sends
            with pytest.raises(CoordinatorError) as refused:
                body = ReachBody.model_construct(port=bad)
                await client._request(ReachView, "POST", "/v1/reachability", body)
            assert refused.value.status == 400 and refused.value.field == "port", refused.value


async def test_a_peer_checks_the_port_it_will_listen_on_or_takes_the_setting_at_its_word(
    coordinator: CoordinatorProcess,
) -> None:
    async with CoordinatorClient(coordinator.url, Identity.generate()) as client:
        found = await check(client, ["/ip4/127.0.0.1/tcp/0"], "auto")
        assert found is not None and found.reachable, found
        assert "127.0.0.1" in found.reason
        private = await check(client, ["/ip4/127.0.0.1/tcp/0"], "private")
        assert private is not None and not private.reachable and "HIVEMARKET_REACHABILITY" in private.reason
        public = await check(client, [], "public")
        assert public is not None and public.reachable
    async with CoordinatorClient("http://127.0.0.1:1", Identity.generate()) as nobody:
        assert await check(nobody, ["/ip4/127.0.0.1/tcp/0"], "auto") is None  # unknown: p2pd decides
