//! The `connect` and `hold` subcommands' flags: the common ones, and
//! hold's `--duration`.

use super::common::CommonArgs;
use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct ConnectCmd {
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Clone, Args)]
pub struct HoldCmd {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Seconds to hold the connections once every process has them up.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub duration: u64,
}
