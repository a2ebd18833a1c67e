"""A TCP relay that delays every byte by a fixed one-way delay in each direction: a delay line.

netshape uses it where the kernel has no netem: tbf shapes the rate, this adds the latency.
Each chunk read is stamped with its arrival time and written out once `now >= stamp + delay`,
in order; chunks in flight overlap, so throughput stays at the link's rate, not chunk/delay.

It runs as its own process (`python -I fsl_edge/delay_relay.py LISTEN_HOST LISTEN_PORT
TARGET_HOST TARGET_PORT DELAY_MS`), so a benchmark's torch work holding the GIL cannot stretch
the delay; it imports only the standard library. It prints `listening HOST:PORT` once bound,
then relays until SIGTERM.

The TCP handshake itself is not delayed (the kernel completes it before we see the connection):
a connect costs no round trip here, every exchange after it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys

CHUNK = 64 * 1024
# What the delay line may hold. It must take rate x delay or it caps throughput (20 Mbit/s x
# 25 ms = 62 KB; 100 Mbit/s x 300 ms = 3.75 MB); beyond that, reading ahead of a slow writer
# only moves bytes from the sender's socket buffer into ours (FIFO either way).
LINE_BYTES = 4 * 1024 * 1024


async def delay_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy reader to writer, each chunk leaving `delay` seconds after it arrived; EOF too."""
    loop = asyncio.get_running_loop()
    line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    queued = 0  # bytes in the line
    room = asyncio.Condition()

    async def take_in() -> None:
        nonlocal queued
        while True:
            data = await reader.read(CHUNK)
            line.put_nowait((loop.time() + delay, data))
            async with room:
                queued += len(data)
                await room.wait_for(lambda: queued < LINE_BYTES)  # full: stop reading (backpressure)
            if not data:
                return

    async def give_out() -> None:
        nonlocal queued
        while True:
            due, data = await line.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()  # half-close, as the sender did
                return
            writer.write(data)
            await writer.drain()
            async with room:
                queued -= len(data)
                room.notify()

    tasks = [asyncio.ensure_future(take_in()), asyncio.ensure_future(give_out())]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    # Nagle would hold a small message back until the previous one is acked: delay on top of ours.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def relay(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    """Accept on `listen`, connect each client to `target`, delay both directions; run forever."""

    async def connection(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            t_reader, t_writer = await asyncio.open_connection(*target)
        except OSError:
            c_writer.close()  # the client sees the refusal as a closed connection
            return
        _nodelay(c_writer)
        _nodelay(t_writer)
        pipes = {asyncio.ensure_future(delay_line(c_reader, t_writer, delay)),
                 asyncio.ensure_future(delay_line(t_reader, c_writer, delay))}
        try:
            # A reset on one side ends both; a clean EOF lets the other direction finish.
            done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
            for pipe in done:
                pipe.exception()  # a peer's reset is how connections end here: retrieve, don't log
        finally:
            for pipe in pipes:
                pipe.cancel()
            for writer in (c_writer, t_writer):
                writer.close()

    server = await asyncio.start_server(connection, *listen, reuse_address=True)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening {host}:{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


def main(argv: list[str]) -> None:
    if len(argv) != 5:
        sys.exit("usage: delay_relay.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS")
    listen_host, listen_port, target_host, target_port, delay_ms = argv
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(relay((listen_host, int(listen_port)), (target_host, int(target_port)),
                          float(delay_ms) / 1000))


if __name__ == "__main__":
    main(sys.argv[1:])
