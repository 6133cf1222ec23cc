"""wstest with permessage-deflate negotiated in every case (issue #17).

The stock fuzzingclient offers permessage-deflate only in sections 12-13.
This wrapper makes every other case offer it too (the suite's default offer,
as 12.1.x makes) and accept the server's response, then runs wstest as usual.
A case whose connection opened without the extension is FAILED, so a server
that silently declines cannot pass.

With the extension negotiated, RSV1 on a data frame means "compressed" (RFC
7692 section 6), so a case that sets RSV1 on an uncompressed text message
(3.4) sends invalid deflate data: the server must still fail the connection
with 1002, which is what the case expects.

Two adjustments keep the cases meaning what they say:
- autobahn's streaming API (beginMessage/sendMessageFrameData, used by 6.4.3,
  6.4.4 and 9.9.1) sets RSV1 when the extension is agreed but sends the bytes
  it is given as they are, so those messages go out uncompressed (RSV1 clear),
  which the RFC allows; the server's replies are still compressed.
- 10.1.1 counts the frames the *client* cut its own 64 KiB message into
  (autoFragmentSize); compressed, the message is one frame, so .ci/run leaves
  that case out of this run (it runs in the plain run).

Used by .ci/run through a wstest shim (AUTOBAHN_VENV pointing at a directory
whose bin/wstest runs this file with the suite's Python).
"""

import re
import sys

from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from autobahn.websocket.protocol import WebSocketProtocol
from autobahntestsuite.case import case as case_module

Case = case_module.Case
_init = Case.__init__
_lost = Case.onConnectionLost


def _accept(response):
    if isinstance(response, PerMessageDeflateResponse):
        return PerMessageDeflateResponseAccept(response)
    return None


def __init__(self, protocol):
    _init(self, protocol)
    # Sections 12-13 set their own offers in init(); leave those alone.
    if not getattr(protocol, "perMessageCompressionOffers", None):
        protocol.perMessageCompressionOffers = [PerMessageDeflateOffer()]
        protocol.perMessageCompressionAccept = _accept


def onConnectionLost(self, failedByMe):
    _lost(self, failedByMe)
    if self.p.connectionWasOpen and self.p._perMessageCompress is None:
        self.behavior = Case.FAILED
        self.passed = False
        self.result = "permessage-deflate was offered but not negotiated"


Case.__init__ = __init__
Case.onConnectionLost = onConnectionLost

_begin = WebSocketProtocol.beginMessage


def beginMessage(self, isBinary=False, doNotCompress=False):
    _begin(self, isBinary=isBinary, doNotCompress=True)


WebSocketProtocol.beginMessage = beginMessage

from autobahntestsuite.wstest import run  # noqa: E402

if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\.pyw|\.exe)?$", "", sys.argv[0])
    sys.exit(run())
