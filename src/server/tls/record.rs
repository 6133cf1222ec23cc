//! The TLS 1.3 record layer of an established session (RFC 8446 §5),
//! sans-IO: once rustls has finished a TLS 1.3 handshake, the session's
//! traffic keys are taken from it (`dangerous_into_kernel_connection`) and
//! its connection, with its state machine and key schedule, is dropped.
//! What stays is this: two AEAD keys, their IVs and sequence numbers, and
//! rustls' `KernelConnection`, which derives the next keys on a key update.
//! An idle wss:// connection holds that and nothing else.
//!
//! What an established TLS 1.3 session can receive, and what it does:
//! - `application_data` records (the only outer type): decrypted in place;
//!   the inner content type decides:
//!   - application data: handed on;
//!   - an alert: `close_notify` ends the input, `user_canceled` is
//!     ignored (four times), any other alert fails the session;
//!   - a handshake message: only `KeyUpdate` (a client may send nothing
//!     else after the handshake, since the server never asks for a
//!     certificate): the receive key is updated; if the client asked, one
//!     `KeyUpdate` of ours goes out before the next data (several requests
//!     are answered by one, RFC 8446 §4.6.3); at most 32 in a row without
//!     application data between them (as rustls and BoringSSL);
//! - anything else (a `change_cipher_spec` or plaintext record, a record
//!   longer than 2^14 + 256, one that does not decrypt, an inner plaintext
//!   over 2^14 + 1 bytes with its padding or with no content type, a 33rd
//!   record with no data in a row): the session fails with the alert RFC
//!   8446 names, sent encrypted.
//!
//! The send key is updated by ourselves before it reaches the AEAD's
//! confidentiality limit (2^23 records for AES-GCM as rustls counts).

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;

/// Record header: type, legacy version, length.
pub const HEADER: usize = 5;
/// The AEAD tag every suite of TLS 1.3 appends.
const TAG: usize = 16;
/// The largest plaintext a record may carry.
pub const MAX_PLAINTEXT: usize = 1 << 14;
/// The largest `TLSCiphertext.length` (RFC 8446 §5.2).
pub const MAX_CIPHERTEXT: usize = MAX_PLAINTEXT + 256;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const KEY_UPDATE: u8 = 24;

/// Alert descriptions we send or read.
const CLOSE_NOTIFY: u8 = 0;
const UNEXPECTED_MESSAGE: u8 = 10;
const BAD_RECORD_MAC: u8 = 20;
const RECORD_OVERFLOW: u8 = 22;
const ILLEGAL_PARAMETER: u8 = 47;
const DECODE_ERROR: u8 = 50;
const INTERNAL_ERROR: u8 = 80;
const USER_CANCELED: u8 = 90;

/// Why the session failed: the alert to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fatal(pub u8);

/// One direction's key, IV and record number.
///
/// The AEAD's expanded context (aws-lc: ~600 bytes of key schedule and
/// GHASH table) is built from the key's bytes when a record needs it and
/// kept only while the direction is busy: from its second use within one
/// sweep period to the end of a sweep period without use ([`Self::sweep`]).
/// So an idle connection holds 32 bytes of key per direction instead, and
/// a connection that gets one message now and then builds the context for
/// it (~0.14 µs for AES-GCM: `cargo bench --bench aead`) and lets it go.
struct Direction {
    algorithm: &'static aead::Algorithm,
    /// The key's bytes and IV, boxed so that moving a `Direction` copies a
    /// pointer, not the key, and wiped when dropped or replaced.
    secret: Box<KeyBytes>,
    seq: u64,
    /// Records this key may protect (the suite's confidentiality limit).
    limit: u64,
    /// The built context, while busy.
    key: Option<LessSafeKey>,
    /// Uses since the last sweep.
    uses: u8,
}

/// A direction's key (16 or 32 of the bytes) and IV.
struct KeyBytes {
    key: [u8; 32],
    iv: [u8; 12],
}

impl Drop for KeyBytes {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.key);
        zeroize::Zeroize::zeroize(&mut self.iv);
    }
}

impl Direction {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets, limit: u64) -> Result<Self, Fatal> {
        let (algorithm, key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            // A suite this layer does not know (`Records::supports` keeps
            // such sessions with rustls).
            _ => return Err(Fatal(INTERNAL_ERROR)),
        };
        let (bytes, iv) = (key.as_ref(), iv.as_ref());
        if bytes.len() != algorithm.key_len() || bytes.len() > 32 || iv.len() != 12 {
            return Err(Fatal(INTERNAL_ERROR));
        }
        let mut secret = Box::new(KeyBytes {
            key: [0; 32],
            iv: [0; 12],
        });
        secret.key[..bytes.len()].copy_from_slice(bytes);
        secret.iv.copy_from_slice(iv);
        Ok(Self {
            algorithm,
            secret,
            seq,
            limit,
            key: None,
            uses: 0,
        })
    }

    /// The AEAD context for one use: the kept one, or a fresh one; give it
    /// back with [`Self::put_back`].
    fn take_key(&mut self) -> Result<LessSafeKey, Fatal> {
        self.uses = self.uses.saturating_add(1);
        match self.key.take() {
            Some(key) => Ok(key),
            None => UnboundKey::new(self.algorithm, &self.secret.key[..self.algorithm.key_len()])
                .map(LessSafeKey::new)
                .map_err(|_| Fatal(INTERNAL_ERROR)),
        }
    }

    /// Keeps the context if the direction is busy, drops it otherwise.
    fn put_back(&mut self, key: LessSafeKey) {
        if self.uses >= 2 {
            self.key = Some(key);
        }
    }

    /// A sweep period ended: a direction not used in it lets its context go.
    fn sweep(&mut self) {
        if self.uses == 0 {
            self.key = None;
        }
        self.uses = 0;
    }

    /// Whether the context is built (tests).
    #[cfg(test)]
    fn is_built(&self) -> bool {
        self.key.is_some()
    }

    /// The nonce of the next record (RFC 8446 §5.3), and the number used.
    fn next_nonce(&mut self) -> Result<Nonce, Fatal> {
        if self.seq >= self.limit {
            return Err(Fatal(INTERNAL_ERROR));
        }
        let mut nonce = self.secret.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// What one call to [`Records::open`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data: `buf[range]` (decrypted in place).
    Data(std::ops::Range<usize>),
    /// A record with nothing for the application (a key update, an empty
    /// record, `user_canceled`).
    Nothing,
    /// The client's `close_notify`.
    Closed,
}

/// An established TLS 1.3 session's record protection.
pub struct Records {
    open: Direction,
    seal: Direction,
    kernel: KernelConnection<ServerConnectionData>,
    /// A key update of ours is owed before the next record we send.
    update_owed: bool,
    /// A handshake message arriving in pieces (a `KeyUpdate` is 5 bytes).
    partial: [u8; 5],
    partial_len: u8,
    /// Key updates since the last application data, and `user_canceled`
    /// alerts: each bounded as rustls and BoringSSL bound them, so that a
    /// client cannot keep the server deriving keys or reading alerts
    /// without sending anything.
    updates_in_a_row: u8,
    warnings: u8,
    /// Records with no data (padding alone, or nothing) in a row: bounded
    /// too, as rustls bounds empty fragments.
    empties_in_a_row: u8,
}

/// Records with no data in a row.
const MAX_EMPTIES_IN_A_ROW: u8 = 32;

/// Key updates in a row without application data between them.
const MAX_UPDATES_IN_A_ROW: u8 = 32;
/// `user_canceled` alerts in a session.
const MAX_WARNINGS: u8 = 4;

impl Records {
    /// Whether this layer can drive a session of `suite` (a TLS 1.3 suite
    /// with one of the three AEADs); others stay with rustls.
    pub fn supports(suite: rustls::SupportedCipherSuite) -> bool {
        use rustls::CipherSuite as S;
        matches!(suite, rustls::SupportedCipherSuite::Tls13(_))
            && matches!(
                suite.suite(),
                S::TLS13_AES_128_GCM_SHA256
                    | S::TLS13_AES_256_GCM_SHA384
                    | S::TLS13_CHACHA20_POLY1305_SHA256
            )
    }

    /// Takes over from rustls. `Err` for a suite this layer cannot drive.
    pub fn new(
        secrets: rustls::ExtractedSecrets,
        kernel: KernelConnection<ServerConnectionData>,
    ) -> Result<Self, Fatal> {
        let limit = kernel
            .negotiated_cipher_suite()
            .tls13()
            .map(|s| s.common.confidentiality_limit)
            .ok_or(Fatal(INTERNAL_ERROR))?;
        let (tx_seq, tx) = secrets.tx;
        let (rx_seq, rx) = secrets.rx;
        Ok(Self {
            open: Direction::new(rx_seq, rx, u64::MAX)?,
            seal: Direction::new(tx_seq, tx, limit)?,
            kernel,
            update_owed: false,
            partial: [0; 5],
            partial_len: 0,
            updates_in_a_row: 0,
            empties_in_a_row: 0,
            warnings: 0,
        })
    }

    /// The length of the complete record at the front of `buf`, if one is
    /// there (`Ok(None)`: wait for more). Refuses a record no TLS 1.3 peer
    /// sends after the handshake, by its header alone.
    pub fn complete(buf: &[u8]) -> Result<Option<usize>, Fatal> {
        if buf.is_empty() {
            return Ok(None);
        }
        if buf[0] != APPLICATION_DATA {
            // change_cipher_spec, a plaintext alert or handshake, garbage.
            return Err(Fatal(UNEXPECTED_MESSAGE));
        }
        if buf.len() < HEADER {
            return Ok(None);
        }
        let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
        if len > MAX_CIPHERTEXT {
            return Err(Fatal(RECORD_OVERFLOW));
        }
        if len < TAG {
            // Not even a tag: it cannot authenticate (rustls says the same).
            return Err(Fatal(BAD_RECORD_MAC));
        }
        Ok((buf.len() >= HEADER + len).then_some(HEADER + len))
    }

    /// Decrypts the complete record `record` (as [`Self::complete`] measured
    /// it) in place and acts on what it carries.
    pub fn open(&mut self, record: &mut [u8]) -> Result<Opened, Fatal> {
        if record.len() < HEADER + TAG {
            return Err(Fatal(BAD_RECORD_MAC));
        }
        let (header, body) = record.split_at_mut(HEADER);
        let nonce = self.open.next_nonce()?;
        let key = self.open.take_key()?;
        let opened = key.open_in_place(nonce, Aad::from(&*header), body);
        self.open.put_back(key);
        let plain = opened.map_err(|_| Fatal(BAD_RECORD_MAC))?;
        // TLSInnerPlaintext (content, type, padding) is at most 2^14 + 1
        // bytes (RFC 8446 §5.4).
        if plain.len() > MAX_PLAINTEXT + 1 {
            return Err(Fatal(RECORD_OVERFLOW));
        }
        // The content type is the last non-zero byte; zeros after it are
        // padding.
        let Some(at) = plain.iter().rposition(|&b| b != 0) else {
            return Err(Fatal(UNEXPECTED_MESSAGE));
        };
        let kind = plain[at];
        if kind != HANDSHAKE && self.partial_len > 0 {
            // A handshake message interrupted by another type.
            return Err(Fatal(UNEXPECTED_MESSAGE));
        }
        match kind {
            APPLICATION_DATA if at == 0 => {
                if self.empties_in_a_row >= MAX_EMPTIES_IN_A_ROW {
                    return Err(Fatal(UNEXPECTED_MESSAGE));
                }
                self.empties_in_a_row += 1;
                Ok(Opened::Nothing)
            }
            APPLICATION_DATA => {
                self.updates_in_a_row = 0;
                self.empties_in_a_row = 0;
                Ok(Opened::Data(HEADER..HEADER + at))
            }
            // Level 1 warning, 2 fatal.
            ALERT => match &plain[..at] {
                [1 | 2, CLOSE_NOTIFY] => Ok(Opened::Closed),
                [1, USER_CANCELED] if self.warnings < MAX_WARNINGS => {
                    self.warnings += 1;
                    Ok(Opened::Nothing)
                }
                [1, USER_CANCELED] => Err(Fatal(UNEXPECTED_MESSAGE)),
                // The peer failed the session: no alert of ours. TLS 1.3
                // takes every other alert, of either level and known or
                // not, as an error alert (RFC 8446 §6).
                [1 | 2, _] => Err(Fatal(NO_ALERT)),
                // Not an alert: a length other than 2, or no such level.
                _ => Err(Fatal(DECODE_ERROR)),
            },
            HANDSHAKE => {
                // Copied out (at most a key update's 5 bytes): `handshake`
                // needs `self` mutably.
                let mut bytes = [0u8; 5];
                let message = &plain[..at];
                if message.is_empty() {
                    return Err(Fatal(UNEXPECTED_MESSAGE));
                }
                let n = message.len().min(bytes.len());
                bytes[..n].copy_from_slice(&message[..n]);
                self.handshake(&bytes[..n], message.len() > n)?;
                Ok(Opened::Nothing)
            }
            _ => Err(Fatal(UNEXPECTED_MESSAGE)),
        }
    }

    /// Handshake bytes after the handshake: only a `KeyUpdate` (type 24,
    /// length 1, `update_not_requested` 0 or `update_requested` 1), which
    /// may come in pieces but must end its record (a key change). `more`:
    /// the record holds more bytes after `bytes`.
    fn handshake(&mut self, bytes: &[u8], more: bool) -> Result<(), Fatal> {
        let have = self.partial_len as usize;
        let take = bytes.len().min(self.partial.len() - have);
        self.partial[have..have + take].copy_from_slice(&bytes[..take]);
        self.partial_len += take as u8;
        let m = &self.partial[..self.partial_len as usize];
        if m[0] != KEY_UPDATE {
            return Err(Fatal(UNEXPECTED_MESSAGE));
        }
        // A key update whose length is not 1 is malformed (RFC 8446 §6.2
        // decode_error), however long the record.
        if m.len() >= 4 && m[1..4] != [0, 0, 1] {
            return Err(Fatal(DECODE_ERROR));
        }
        // Bytes after a whole key update in its record: a handshake
        // message spanning a key change (§5.1 unexpected_message).
        if more || take < bytes.len() {
            return Err(Fatal(UNEXPECTED_MESSAGE));
        }
        if m.len() < 5 {
            return Ok(());
        }
        let requested = match m[4] {
            0 => false,
            1 => true,
            _ => return Err(Fatal(ILLEGAL_PARAMETER)),
        };
        self.partial_len = 0;
        if self.updates_in_a_row >= MAX_UPDATES_IN_A_ROW {
            return Err(Fatal(UNEXPECTED_MESSAGE));
        }
        self.updates_in_a_row += 1;
        let (seq, secrets) = self
            .kernel
            .update_rx_secret()
            .map_err(|_| Fatal(INTERNAL_ERROR))?;
        self.open = Direction::new(seq, secrets, u64::MAX)?;
        self.update_owed |= requested;
        Ok(())
    }

    /// Bytes [`Self::seal`] adds to `len` bytes of plaintext sealed as
    /// records of at most 16 KiB, plus a key update that may come first.
    pub fn overhead(len: usize) -> usize {
        let records = len.div_ceil(MAX_PLAINTEXT).max(1);
        records * (HEADER + 1 + TAG) + HEADER + 5 + 1 + TAG
    }

    /// Seals `data` as application-data records of at most 16 KiB into
    /// `out` (which must have [`Self::overhead`] room beyond `data`'s
    /// length); returns the bytes written. A key update owed (asked for by
    /// the client, or the send key's limit reached) goes first.
    pub fn seal(&mut self, data: &[u8], out: &mut [u8]) -> Result<usize, Fatal> {
        let mut n = self.before_sealing(out)?;
        let key = self.seal.take_key()?;
        let mut sealed = Ok(());
        for chunk in data.chunks(MAX_PLAINTEXT) {
            match self.seal_one(&key, APPLICATION_DATA, chunk, &mut out[n..]) {
                Ok(len) => n += len,
                Err(f) => {
                    sealed = Err(f);
                    break;
                }
            }
        }
        self.seal.put_back(key);
        sealed.map(|()| n)
    }

    /// Seals an alert (`close_notify` or a fatal one) into `out` (room:
    /// [`Self::overhead`] of 2 bytes).
    pub fn seal_alert(&mut self, description: u8, out: &mut [u8]) -> Result<usize, Fatal> {
        let level = if description == CLOSE_NOTIFY { 1 } else { 2 };
        let n = self.before_sealing(out)?;
        let key = self.seal.take_key()?;
        let sealed = self.seal_one(&key, ALERT, &[level, description], &mut out[n..]);
        self.seal.put_back(key);
        Ok(n + sealed?)
    }

    /// A sweep period ended: a direction not used in it lets its AEAD
    /// context go (see [`Direction`]).
    pub fn sweep(&mut self) {
        self.open.sweep();
        self.seal.sweep();
    }

    /// Whether (receive, send) hold a built AEAD context (tests).
    #[cfg(test)]
    pub fn built(&self) -> (bool, bool) {
        (self.open.is_built(), self.seal.is_built())
    }

    /// The key update owed, if any, and the new send key.
    fn before_sealing(&mut self, out: &mut [u8]) -> Result<usize, Fatal> {
        // One call seals a few records (at most 64 KiB); the margin keeps
        // the key under its limit whatever the call.
        if !self.update_owed && self.seal.seq < self.seal.limit.saturating_sub(UPDATE_MARGIN) {
            return Ok(0);
        }
        // KeyUpdate(update_not_requested), under the old key.
        let key = self.seal.take_key()?;
        let sealed = self.seal_one(&key, HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], out);
        drop(key);
        let n = sealed?;
        let (seq, secrets) = self
            .kernel
            .update_tx_secret()
            .map_err(|_| Fatal(INTERNAL_ERROR))?;
        self.seal = Direction::new(seq, secrets, self.seal.limit)?;
        self.update_owed = false;
        Ok(n)
    }

    /// One record of `kind` carrying `data` (at most 16 KiB).
    fn seal_one(
        &mut self,
        key: &LessSafeKey,
        kind: u8,
        data: &[u8],
        out: &mut [u8],
    ) -> Result<usize, Fatal> {
        let len = data.len() + 1 + TAG;
        let total = HEADER + len;
        // The caller sized `out` by `overhead`; short of room, refuse
        // rather than slice past it.
        let Some(out) = out.get_mut(..total) else {
            return Err(Fatal(INTERNAL_ERROR));
        };
        out[0] = APPLICATION_DATA;
        out[1..3].copy_from_slice(&[3, 3]);
        out[3..5].copy_from_slice(&(len as u16).to_be_bytes());
        let (header, body) = out.split_at_mut(HEADER);
        let (cipher, kind_and_tag) = body.split_at_mut(data.len());
        let nonce = self.seal.next_nonce()?;
        // Encrypted from where the bytes are (a shared frame, or the
        // stage) straight into the record: no copy of the plaintext into
        // `out` first. The content type is the inner plaintext's last byte.
        key.seal_out_of_place_scatter(
            nonce,
            Aad::from(&*header),
            data,
            cipher,
            &[kind],
            kind_and_tag,
        )
        .map_err(|_| Fatal(INTERNAL_ERROR))?;
        Ok(total)
    }
}

/// Reading an alert other than `close_notify` or `user_canceled`: the
/// session ends without an alert of ours (the peer already failed it).
const NO_ALERT: u8 = 255;

/// The send key is replaced this many records before its limit.
const UPDATE_MARGIN: u64 = 1024;

impl Fatal {
    /// The alert to send for it, if any.
    pub fn alert(self) -> Option<u8> {
        (self.0 != NO_ALERT).then_some(self.0)
    }
}
