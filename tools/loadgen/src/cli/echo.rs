//! The `echo` subcommand's flags and their validation into an
//! [`EchoPlan`].

use super::common::CommonArgs;
use super::plan::{EchoPlan, Work};
use super::{MAX_WINDOW, secs, size};
use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct EchoCmd {
    /// Echo endpoint URL(s), e.g. ws://HOST:PORT/echo.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Messages in flight per connection (a new one leaves as each echo returns).
    #[arg(long, default_value_t = 1, value_name = "M")]
    pub messages_in_flight: usize,

    /// Seconds to keep sending.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub duration: u64,

    /// Payload bytes per message (at least 16).
    #[arg(long, default_value_t = 64, value_name = "BYTES")]
    pub size: usize,

    /// Seconds to wait for the last echoes after sending stops.
    #[arg(long, default_value_t = 5, value_name = "SECS")]
    pub drain_timeout: u64,
}

impl EchoCmd {
    pub(super) fn work(&self) -> Result<Work, String> {
        if self.messages_in_flight == 0 || self.messages_in_flight > MAX_WINDOW {
            return Err(format!(
                "--messages-in-flight {}: must be between 1 and {MAX_WINDOW}",
                self.messages_in_flight
            ));
        }
        Ok(Work::Echo(EchoPlan {
            window: self.messages_in_flight,
            duration: secs("duration", self.duration, 1)?,
            size: size(self.size)?,
            drain_timeout: secs("drain-timeout", self.drain_timeout, 1)?,
        }))
    }
}
