"""MQTT over QUIC with aioquic (an independent QUIC stack): EMQX single-stream mode.

Usage: mqtt_quic.py PORT CAFILE ALPN TOPIC PAYLOAD [CERTFILE KEYFILE]
Connects (server name localhost; with a client certificate when CERTFILE and KEYFILE are
given), sends an MQTT 3.1.1 CONNECT and a QoS 1 PUBLISH of PAYLOAD to TOPIC on the first
bidirectional stream, and prints the topic of the first PUBLISH that comes back. Exits 2 when
the QUIC handshake fails, 3 when the CONNECT is refused, 4 when the server closes the
connection before its CONNACK (in TLS 1.3 a client may finish its side of the handshake before
the server has checked the client's certificate). With MQTT_QUIC_HOLD set, it then keeps the
connection until the server ends it and prints `closed` (exit 5: still open after 10 s).
"""
import asyncio
import os
import ssl
import sys

from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration


def packet(kind: int, body: bytes) -> bytes:
    n, length = len(body), bytearray()
    while True:
        byte, n = n % 128, n // 128
        length.append(byte | (0x80 if n else 0))
        if not n:
            return bytes([kind]) + bytes(length) + body


def string(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


async def read_packet(reader):
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        b = (await reader.readexactly(1))[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return first, await reader.readexactly(length)


async def main(port, cafile, alpn, topic, payload, identity):
    cfg = QuicConfiguration(is_client=True, alpn_protocols=[alpn], server_name="localhost")
    cfg.load_verify_locations(cafile)
    if identity:
        cfg.load_cert_chain(identity[0], identity[1])
    cfg.verify_mode = ssl.CERT_REQUIRED
    try:
        client = connect("127.0.0.1", port, configuration=cfg, wait_connected=True)
        conn = await asyncio.wait_for(client.__aenter__(), 5)
    except Exception as e:  # the handshake failed
        print(f"handshake failed: {e!r}", file=sys.stderr)
        sys.exit(2)
    reader, writer = await conn.create_stream()
    writer.write(packet(0x10, string(b"MQTT") + bytes([4, 2]) + (60).to_bytes(2, "big") + string(b"quic-1")))
    try:
        kind, body = await asyncio.wait_for(read_packet(reader), 5)
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError) as e:
        print(f"closed before CONNACK: {e!r}", file=sys.stderr)
        sys.exit(4)
    if kind != 0x20 or body[1] != 0:
        sys.exit(3)
    writer.write(packet(0x32, string(topic.encode()) + (1).to_bytes(2, "big") + payload.encode()))
    while True:
        kind, body = await asyncio.wait_for(read_packet(reader), 5)
        if kind >> 4 == 3:
            n = int.from_bytes(body[:2], "big")
            print(body[2 : 2 + n].decode())
            if kind & 0x06:  # QoS 1: acknowledge
                writer.write(packet(0x40, body[2 + n : 4 + n]))
            break
    if os.environ.get("MQTT_QUIC_HOLD"):
        # Keep the connection until the server ends it; say so on stdout.
        sys.stdout.flush()
        try:
            while True:
                await asyncio.wait_for(read_packet(reader), 10)
        except asyncio.TimeoutError:
            sys.exit(5)
        except Exception:
            print("closed", flush=True)
            os._exit(0)
    writer.write(bytes([0xE0, 0]))  # DISCONNECT
    await asyncio.sleep(0.1)
    conn.close()
    await client.__aexit__(None, None, None)


if __name__ == "__main__":
    port, cafile, alpn, topic, payload = sys.argv[1:6]
    asyncio.run(main(int(port), cafile, alpn, topic, payload, sys.argv[6:8]))
