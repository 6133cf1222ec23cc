"""Round-trips text and binary through a corecast /echo endpoint with the
Python `websockets` library (an independent client): ws:// or wss://
(trusting the CA file given for wss).

    python echo_client.py URL [CAFILE]
"""

import asyncio
import http.client
import json
import ssl
import sys
import urllib.parse

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
    # Publications to a subscriber that agreed to permessage-deflate: the
    # server compresses each once for all such subscribers.
    sub_url = url.replace("/echo", "/ws?topics=py.deflate")
    async with websockets.connect(sub_url, ssl=context, max_size=None) as sub:
        headers = sub.response.headers if getattr(sub, "response", None) else sub.response_headers
        assert headers.get("Sec-WebSocket-Extensions", "").startswith("permessage-deflate")
        await asyncio.sleep(0.2)
        parts = urllib.parse.urlsplit(url)
        sent = []
        for i in range(3):
            body = json.dumps(
                [{"sym": f"SYM{j}", "bid": 100 + i + j / 100, "ask": 100.5 + i + j / 100} for j in range(40)]
            )
            conn = (
                http.client.HTTPSConnection(parts.hostname, parts.port, context=context)
                if parts.scheme == "wss"
                else http.client.HTTPConnection(parts.hostname, parts.port)
            )
            conn.request("POST", "/publish/py.deflate", body, {"Content-Type": "text/plain"})
            assert conn.getresponse().status == 204
            conn.close()
            sent.append(body)
        for want in sent:
            got = await asyncio.wait_for(sub.recv(), 10)
            assert got == want, "a publication arrived changed"
    print(f"python websockets {websockets.__version__}: {url}: text and binary round trips OK, 3 publications of {len(sent[0])} B received ({ext})")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
