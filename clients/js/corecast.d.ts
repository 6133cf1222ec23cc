// Types for corecast.mjs (the corecast.v1 client).

export interface Publication {
  topic: string;
  /** The topic's numbering lifetime. */
  epoch: number;
  /** The publication's number in the topic's one order (from 1). */
  seq: number;
  /** The payload: a string when published as text, bytes when binary. */
  data: string | Uint8Array;
  /** The topic's last value, sent on subscribing (published before). */
  snapshot: boolean;
  /** Replayed from the server's history after a reconnection. */
  recovered: boolean;
  /** Stands for older publications of its topic it replaced, alone or with the newest of the topic's other conflation keys (see the `conflated` event). */
  conflated: boolean;
}

export type Event =
  | { type: "open" }
  | { type: "close"; code: number; reason: string; delayMs: number | null }
  | {
      type: "recovered";
      topic: string;
      epoch: number;
      from: number;
      to: number;
      complete: boolean;
      reason?: "epoch" | "too_old" | "capped" | "ahead";
    }
  | { type: "gap"; topic: string; epoch: number; from: number; to: number; reason: string }
  | { type: "conflated"; topic: string; epoch: number; from: number; to: number; replaced: number }
  | { type: "reset"; topic: string; epoch: number; previousEpoch: number | null }
  | { type: "busy"; retryMs: number }
  | { type: "error"; reason: string };

export interface Options {
  /** A WebSocket class (default: globalThis.WebSocket). */
  WebSocket?: { new (url: string, protocols?: string | string[]): WebSocket };
  /** First reconnection delay bound, ms (default 100). */
  minDelayMs?: number;
  /** Largest reconnection delay bound, ms (default 10 000). */
  maxDelayMs?: number;
  /** Reconnection delay (ms) for attempt 0, 1, …; default full jitter. */
  backoff?: (attempt: number) => number;
  /** Gets every event. */
  onEvent?: (e: Event) => void;
  /** At most this many publications per second of each topic (the newest; the rest `conflated`). */
  maxRate?: number;
}

export class CorecastClient {
  constructor(url: string, options?: Options);
  on(type: Event["type"] | "*", fn: (e: Event) => void): this;
  /** A topic, or a pattern (`prices.*.EUR`, `news.>`). */
  /** `options.maxRate`: at most this many publications per second of each of its topics (default: the client's `maxRate`; 0: none). */
  subscribe(name: string, handler: (p: Publication) => void, options?: { maxRate?: number }): void;
  unsubscribe(name: string): void;
  position(topic: string): { epoch: number; seq: number } | null;
  /** Closes for good (no reconnection). */
  close(): void;
  /** Drops the connection as a network failure would; the client reconnects. */
  dropConnection(): void;
}

/** Whether `name` is a pattern: a `*` token, or a last `>` token. */
export function isPattern(name: string): boolean;
/** Whether `pattern` matches `topic` (docs/PROTOCOL.md, "Wildcards"). */
export function matches(pattern: string, topic: string): boolean;
