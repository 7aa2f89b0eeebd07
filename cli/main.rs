//! `kiln`: the command-line front end. It parses flags, renders the
//! engine's events, and turns errors into messages and exit codes.
mod args;
mod build;
mod cache;
mod capture;
mod context;
mod index;
mod metadata;
mod plan;
mod platforms;
mod progress;
mod report;
mod sink;
mod warm;

use clap::Parser;

use kiln_engine::{step_runner_main, zygote_main, STEP_RUNNER_ARG, ZYGOTE_ARG};

fn main() {
    // The RUN step runner, and the zygote that forks it, are this binary
    // re-executed; they must stay single-threaded, so they run before
    // anything else starts.
    match std::env::args_os().nth(1) {
        Some(a) if a == STEP_RUNNER_ARG => leave(step_runner_main()),
        Some(a) if a == ZYGOTE_ARG => leave(zygote_main()),
        _ => {}
    }
    let cli = args::Cli::parse_from(args::with_default_command(std::env::args_os()));
    sink::init(cli.log_format, cli.log_timestamp, &cli.verbosity);
    let result = match cli.command {
        args::Commands::Build(a) => build::run(*a),
        args::Commands::Plan(a) => plan::run(a),
        args::Commands::Cache(a) => cache::run(a),
        args::Commands::Warm(a) => warm::run(*a),
        args::Commands::Index(a) => index::run(a),
    };
    if let Err(e) = result {
        sink::sink().error(&kiln_cachestore::error::error_chain(e.as_ref()));
        leave(1);
    }
    leave(0)
}

/// Ends the process once its work is done and its output flushed, without
/// libc's exit handlers: they run RocksDB's static destructors, 2-3 ms at
/// every exit (a no-change build now takes 12). Nothing is lost by skipping
/// them: the index is closed (or, like after SIGKILL, its writes are with
/// the kernel), and the sink writes unbuffered.
pub(crate) fn leave(code: i32) -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // SAFETY: `_exit` only ends the process.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = anyhow::Error::new(io).context("x/index.json: entity not found");
        let e = e.context("base image x");
        assert_eq!(
            kiln_cachestore::error::error_chain(e.as_ref()),
            "base image x: x/index.json: entity not found"
        );
    }
}
