#!/usr/bin/env python3
"""Writes quotes-1k.jsonl: a corpus of JSON market-data and notification
messages of about 1 KiB each (900-1150 bytes), one compact JSON object per
line, for `loadgen fanout --corpus` (issue #17's permessage-deflate
measurements).

Deterministic: a seeded generator, so the committed file is reproduced
byte for byte by `tools/loadgen/corpus/gen-quotes.py > quotes-1k.jsonl`
(Python 3.8+, standard library only).

Four kinds of message, in the proportions of a busy market-data feed
with user notifications mixed in:
  book    (35 %) a depth snapshot: 20-30 price levels a side
  trades  (25 %) a batch of prints with ids, sizes, sides, conditions
  quote   (25 %) a summary quote with the day's statistics and recent prints
  notice  (15 %) a user notification: title, body text, actions, links
Prices walk randomly per symbol, timestamps advance by random steps,
sequence numbers and ids vary: compression sees realistic repetition
(keys, structure) and realistic entropy (numbers, ids, text), not a
repeated template.
"""

import json
import random
import sys
import time

LINES = 400
SEED = 17
LOW, HIGH = 900, 1150

SYMBOLS = [
    ("AAPL", "Apple Inc.", "XNAS", 189.0), ("MSFT", "Microsoft Corporation", "XNAS", 412.0),
    ("NVDA", "NVIDIA Corporation", "XNAS", 121.0), ("AMZN", "Amazon.com, Inc.", "XNAS", 183.0),
    ("GOOGL", "Alphabet Inc. Class A", "XNAS", 171.0), ("META", "Meta Platforms, Inc.", "XNAS", 497.0),
    ("TSLA", "Tesla, Inc.", "XNAS", 177.0), ("AVGO", "Broadcom Inc.", "XNAS", 1380.0),
    ("JPM", "JPMorgan Chase & Co.", "XNYS", 198.0), ("V", "Visa Inc.", "XNYS", 276.0),
    ("XOM", "Exxon Mobil Corporation", "XNYS", 117.0), ("UNH", "UnitedHealth Group Incorporated", "XNYS", 503.0),
    ("JNJ", "Johnson & Johnson", "XNYS", 152.0), ("WMT", "Walmart Inc.", "XNYS", 60.5),
    ("PG", "The Procter & Gamble Company", "XNYS", 165.0), ("MA", "Mastercard Incorporated", "XNYS", 455.0),
    ("HD", "The Home Depot, Inc.", "XNYS", 336.0), ("CVX", "Chevron Corporation", "XNYS", 160.0),
    ("KO", "The Coca-Cola Company", "XNYS", 62.8), ("PEP", "PepsiCo, Inc.", "XNAS", 176.0),
    ("COST", "Costco Wholesale Corporation", "XNAS", 781.0), ("ADBE", "Adobe Inc.", "XNAS", 478.0),
    ("CRM", "Salesforce, Inc.", "XNYS", 289.0), ("NFLX", "Netflix, Inc.", "XNAS", 610.0),
    ("AMD", "Advanced Micro Devices, Inc.", "XNAS", 160.0), ("INTC", "Intel Corporation", "XNAS", 30.9),
    ("ORCL", "Oracle Corporation", "XNYS", 118.0), ("CSCO", "Cisco Systems, Inc.", "XNAS", 47.6),
    ("BAC", "Bank of America Corporation", "XNYS", 38.9), ("DIS", "The Walt Disney Company", "XNYS", 103.0),
    ("SAP", "SAP SE", "XETR", 174.0), ("ASML", "ASML Holding N.V.", "XAMS", 871.0),
    ("MC", "LVMH Moet Hennessy Louis Vuitton SE", "XPAR", 745.0), ("NESN", "Nestle S.A.", "XSWX", 91.2),
    ("SHEL", "Shell plc", "XLON", 28.4), ("AZN", "AstraZeneca PLC", "XLON", 121.5),
    ("7203", "Toyota Motor Corporation", "XTKS", 3340.0), ("6758", "Sony Group Corporation", "XTKS", 12900.0),
    ("BTC-USD", "Bitcoin / US Dollar", "CBSE", 66200.0), ("ETH-USD", "Ether / US Dollar", "CBSE", 3050.0),
    ("SOL-USD", "Solana / US Dollar", "CBSE", 162.0), ("EURUSD", "Euro / US Dollar", "FXCM", 1.0812),
    ("GBPUSD", "British Pound / US Dollar", "FXCM", 1.2655), ("USDJPY", "US Dollar / Japanese Yen", "FXCM", 155.62),
    ("ESM6", "E-mini S&P 500 Jun 2026", "XCME", 5320.25), ("CLN6", "Crude Oil Jul 2026", "XNYM", 78.41),
]
CURRENCY = {"XNAS": "USD", "XNYS": "USD", "XETR": "EUR", "XAMS": "EUR", "XPAR": "EUR", "XSWX": "CHF",
            "XLON": "GBP", "XTKS": "JPY", "CBSE": "USD", "FXCM": "USD", "XCME": "USD", "XNYM": "USD"}
CONDITIONS = ["@", "F", "I", "T", "O", "6", "Z", "W", "4", "X"]
WORDS = ("shares rose after the company reported quarterly revenue above analyst estimates and raised "
         "its full year guidance while margins narrowed on higher input costs and the stock traded at "
         "record volume as investors weighed the outlook for rates inflation and consumer demand in a "
         "session marked by rotation out of growth names into energy financials and industrials with "
         "options activity concentrated in near term calls").split()
ACTIONS = [("View chart", "chart"), ("Open position", "trade"), ("Mute alerts", "mute"),
           ("Read more", "news"), ("Set new alert", "alert"), ("Share", "share")]


class Market:
    def __init__(self, rng):
        self.rng = rng
        self.px = {s[0]: s[3] for s in SYMBOLS}
        self.seq = {s[0]: rng.randrange(10_000_000, 90_000_000) for s in SYMBOLS}
        self.t_us = 1_778_765_400_000_000 + rng.randrange(0, 10**9)  # 2026-05-14, 13:30 UTC or so

    def tick(self, sym):
        r = self.rng
        self.t_us += r.randrange(50, 40_000)
        self.seq[sym] += r.randrange(1, 40)
        self.px[sym] *= 1 + r.gauss(0, 0.0008)
        return self.px[sym]

    def iso(self):
        s, us = divmod(self.t_us, 1_000_000)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)) + f".{us:06d}Z"


def decimals(px):
    return 5 if px < 10 else 4 if px < 100 else 2 if px < 10_000 else 1


def fmt(px, d):
    return f"{px:.{d}f}"


def tick_size(px, d):
    return 10 ** -d * (5 if d == 1 else 1)


def dumps(o):
    return json.dumps(o, separators=(",", ":"), ensure_ascii=False)


def fill(base, key, make, rng):
    """Appends make() to base[key] until the message is in [LOW, HIGH)."""
    target = rng.randrange(LOW + 20, HIGH - 60)
    while len(dumps(base)) < target:
        base[key].append(make())
    while len(dumps(base)) >= HIGH:
        base[key].pop()
    return base


def book(m, sym, venue):
    r = m.rng
    px = m.tick(sym)
    d = decimals(px)
    step = tick_size(px, d)
    bids, asks = [], []
    msg = {"type": "book", "venue": venue, "symbol": sym, "seq": m.seq[sym], "ts": m.iso(),
           "depth": 0, "bids": bids, "asks": asks, "checksum": r.randrange(0, 2**32)}
    # Distinct levels, one or two ticks apart, away from the mid.
    off = [0, 0]

    def add():
        off[0] += r.randrange(1, 3)
        off[1] += r.randrange(1, 3)
        bids.append([fmt(px - step * off[0], d), r.randrange(1, 60) * 100, r.randrange(1, 12)])
        asks.append([fmt(px + step * off[1], d), r.randrange(1, 60) * 100, r.randrange(1, 12)])
        msg["depth"] += 1

    target = r.randrange(LOW + 20, HIGH - 60)
    while len(dumps(msg)) < target:
        add()
    while len(dumps(msg)) >= HIGH:
        bids.pop(), asks.pop()
        msg["depth"] -= 1
    return msg


def trades(m, sym, venue):
    r = m.rng
    msg = {"type": "trades", "venue": venue, "symbol": sym, "seq": m.seq[sym], "trades": []}

    def one():
        px = m.tick(sym)
        t = {"id": f"{r.getrandbits(48):012x}", "p": fmt(px, decimals(px)),
             "q": r.choice([1, 5, 10, 25, 50, 100, 100, 100, 200, 300, 500, 1000]),
             "side": r.choice("BS"), "ts": m.t_us}
        if r.random() < 0.4:
            t["cond"] = r.sample(CONDITIONS, r.randrange(1, 3))
        return t

    return fill(msg, "trades", one, r)


def quote(m, sym, name, venue):
    r = m.rng
    px = m.tick(sym)
    d = decimals(px)
    spread = tick_size(px, d) * r.randrange(1, 4)
    prev = px * (1 + r.gauss(0, 0.015))
    hi, lo = max(px, prev) * (1 + abs(r.gauss(0, 0.006))), min(px, prev) * (1 - abs(r.gauss(0, 0.006)))
    vol = r.randrange(200_000, 80_000_000)
    msg = {
        "type": "quote", "symbol": sym, "name": name, "venue": venue, "currency": CURRENCY[venue],
        "seq": m.seq[sym], "ts": m.iso(), "status": r.choice(["open", "open", "open", "auction", "closed"]),
        "bid": fmt(px - spread / 2, d), "bidSize": r.randrange(1, 90) * 100,
        "ask": fmt(px + spread / 2, d), "askSize": r.randrange(1, 90) * 100,
        "last": fmt(px, d), "lastSize": r.randrange(1, 30) * 100,
        "open": fmt(prev * (1 + r.gauss(0, 0.004)), d), "high": fmt(hi, d), "low": fmt(lo, d),
        "prevClose": fmt(prev, d), "change": fmt(px - prev, d), "changePct": round((px / prev - 1) * 100, 3),
        "volume": vol, "vwap": fmt((hi + lo + px) / 3, d), "turnover": round(vol * px, 2),
        "high52w": fmt(hi * (1.1 + r.random() * 0.5), d), "low52w": fmt(lo * (0.5 + r.random() * 0.35), d),
        "marketCap": r.randrange(10**9, 3 * 10**12), "pe": round(r.uniform(8, 70), 2),
        "halted": False, "recent": [],
    }

    def prior():
        p = m.tick(sym)
        return [fmt(p, d), r.randrange(1, 40) * 100, m.t_us]

    return fill(msg, "recent", prior, r)


def notice(m, sym, name, venue):
    r = m.rng
    px = m.tick(sym)
    d = decimals(px)
    pct = r.uniform(-6, 6)
    kind = r.choice(["price_cross", "pct_move", "volume_spike", "earnings", "news"])
    nid = f"{r.getrandbits(32):08x}-{r.getrandbits(16):04x}-4{r.getrandbits(12):03x}-{r.getrandbits(16):04x}-{r.getrandbits(48):012x}"
    words = r.sample(WORDS, r.randrange(18, 30))
    msg = {
        "type": "notification", "id": nid, "userId": f"u_{r.getrandbits(40):010x}",
        "channel": r.choice(["push", "web", "email"]), "priority": r.choice(["low", "normal", "high"]),
        "title": f"{sym} {'up' if pct > 0 else 'down'} {abs(pct):.1f}% at {fmt(px, d)}",
        "body": f"{name} ({sym}) " + " ".join(words) + ".",
        "symbol": sym, "venue": venue,
        "trigger": {"kind": kind, "threshold": fmt(px * (1 - pct / 100), d),
                    "direction": "above" if pct > 0 else "below", "ruleId": r.randrange(1000, 999_999)},
        "createdAt": m.iso(), "ttlSeconds": r.choice([300, 900, 3600, 86400]), "locale": r.choice(["en-US", "en-GB", "de-DE", "fr-FR", "ja-JP"]),
        "actions": [],
    }

    def action():
        label, verb = r.choice(ACTIONS)
        return {"label": label, "url": f"https://app.example.com/{verb}/{sym}?nid={nid[:8]}&src={msg['channel']}&v={r.randrange(1, 99)}"}

    return fill(msg, "actions", action, r)


def main():
    rng = random.Random(SEED)
    m = Market(rng)
    out = []
    for _ in range(LINES):
        sym, name, venue, _ = rng.choice(SYMBOLS)
        k = rng.random()
        if k < 0.35:
            msg = book(m, sym, venue)
        elif k < 0.60:
            msg = trades(m, sym, venue)
        elif k < 0.85:
            msg = quote(m, sym, name, venue)
        else:
            msg = notice(m, sym, name, venue)
        line = dumps(msg)
        assert LOW <= len(line.encode()) < HIGH, (len(line), line[:80])
        out.append(line)
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
