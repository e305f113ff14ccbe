"""uvicorn's server, with a drain on SIGTERM (Cloud Run scaling in) before it shuts down."""
import asyncio

import uvicorn


class Server(uvicorn.Server):
    """uvicorn's server, which on the first SIGTERM or Ctrl+C drains the gate (see app.gate.Gate) before
    shutting down as uvicorn does: it stops accepting connections at once, but keeps answering the ones
    it has (503 to a generation and to /v2/health/ready, e.g. a keep-alive probe) until the generation
    in flight has ended. A second signal shuts down without waiting."""

    def __init__(self, config, app):
        super().__init__(config)
        self.app, self.draining = app, None

    def handle_exit(self, sig, frame):
        gate = getattr(self.app.state, "gate", None)
        if gate is None or self.draining:
            return super().handle_exit(sig, frame)
        self.draining = True  # a signal handler: the drain runs on the event loop
        gate.loop.call_soon_threadsafe(self.start_drain, gate, sig)

    def start_drain(self, gate, sig):
        self.draining = asyncio.ensure_future(self.drain(gate, sig))  # held: a task nobody holds may vanish

    async def drain(self, gate, sig):
        gate.drain()
        for server in self.servers:
            server.close()
        while gate.running:
            await asyncio.sleep(0.05)
        super().handle_exit(sig, None)
