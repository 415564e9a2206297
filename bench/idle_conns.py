#!/usr/bin/env python3
"""Open N keep-alive HTTP/1.1 connections to HOST:PORT, send one complete request on each and read its response,
then hold every connection idle.

Usage: idle_conns.py HOST PORT PATH N HOLD_SECONDS READY_FILE

Once all N connections have had their response (or failed), one JSON line goes to READY_FILE (and stdout):
{"opened": .., "ok": .., "failed": .., "open_secs": ..}. The connections are then held for HOLD_SECONDS (the caller
measures the server meanwhile); afterwards one more JSON line tells how many were still open. Every wait is bounded.
"""

import asyncio
import json
import sys
import time

CONNECT_CONCURRENCY = 256
STEP_TIMEOUT = 20.0


async def one(host, port, path, sem, conns, stats):
    async with sem:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), STEP_TIMEOUT)
        except Exception:  # noqa: BLE001 - counted, not fatal
            stats["failed"] += 1
            return
        stats["opened"] += 1
        try:
            request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: application/fhir+json\r\n\r\n"
            writer.write(request.encode())
            await asyncio.wait_for(writer.drain(), STEP_TIMEOUT)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_TIMEOUT)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            length = None
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
                if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                    length = -1
            if length is None or length < 0:
                # Not expected from these routes; a chunked body is read to its terminating chunk.
                while True:
                    size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), STEP_TIMEOUT)
                    size = int(size_line.split(b";")[0], 16)
                    await asyncio.wait_for(reader.readexactly(size + 2), STEP_TIMEOUT)
                    if size == 0:
                        break
            else:
                await asyncio.wait_for(reader.readexactly(length), STEP_TIMEOUT)
            if status == 200:
                stats["ok"] += 1
            else:
                stats["bad_status"] += 1
            conns.append((reader, writer))
        except Exception:  # noqa: BLE001
            stats["failed"] += 1
            writer.close()


async def main():
    host, port, path, n, hold, ready_file = sys.argv[1:7]
    port, n, hold = int(port), int(n), float(hold)
    stats = {"opened": 0, "ok": 0, "bad_status": 0, "failed": 0}
    conns = []
    sem = asyncio.Semaphore(CONNECT_CONCURRENCY)
    start = time.monotonic()
    await asyncio.gather(*(one(host, port, path, sem, conns, stats) for _ in range(n)))
    stats["open_secs"] = round(time.monotonic() - start, 2)
    stats["held"] = len(conns)
    line = json.dumps(stats)
    with open(ready_file, "w") as f:
        f.write(line + "\n")
    print(line, flush=True)
    await asyncio.sleep(hold)
    # A connection the server closed meanwhile has had its EOF delivered to the reader by now.
    still_open = sum(1 for reader, writer in conns if not reader.at_eof() and not writer.transport.is_closing())
    print(json.dumps({"still_open_after_hold": still_open}), flush=True)
    for _, writer in conns:
        writer.close()


if __name__ == "__main__":
    asyncio.run(main())
