"""Round-trips text and binary through a corecast /echo endpoint with the
Python `websockets` library (an independent client): ws:// or wss://
(trusting the CA file given for wss).

    python echo_client.py URL [CAFILE]
"""

import asyncio
import ssl
import sys

import websockets


async def main(url, cafile):
    context = None
    if url.startswith("wss://"):
        context = ssl.create_default_context(cafile=cafile)
    async with websockets.connect(url, ssl=context, max_size=None) as ws:
        # The server agrees to the permessage-deflate websockets offers by
        # default: the long messages below travel compressed both ways.
        response = getattr(ws, "response", None)
        headers = response.headers if response is not None else ws.response_headers
        ext = headers.get("Sec-WebSocket-Extensions", "")
        assert ext.startswith("permessage-deflate"), f"no permessage-deflate: {ext!r}"
        for text in ["hello", "é€𝄞 unicode", "x" * 70_000]:
            await ws.send(text)
            got = await ws.recv()
            assert got == text, f"text of {len(text)} chars echoed wrong"
        for size in [0, 1, 125, 126, 65_535, 65_536, 1_000_003]:
            data = bytes((i * 31) % 251 for i in range(size))
            await ws.send(data)
            got = await ws.recv()
            assert got == data, f"{size} binary bytes echoed wrong"
    print(f"python websockets {websockets.__version__}: {url}: text and binary round trips OK ({ext})")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
