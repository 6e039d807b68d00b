//! Writing to stdout and stderr without the panics of `println!` and `eprintln!`.
//!
//! Rust starts every program with SIGPIPE ignored, so writing to a pipe whose reader has gone
//! (`turnstile status | head -1`) is an error, on which `println!` panics. Here a failed write
//! to stdout becomes [`Closed`], which `main` turns into a quiet exit (the reader has all it
//! wanted); a failed write to stderr is dropped, as there is nowhere left to say it. Nothing
//! else changes: the coordinator keeps serving when the terminal that started it goes away,
//! and the guard never dies between a command and its wrapper over a closed stderr.

use std::fmt;
use std::io::Write;

/// Stdout could not be written: its reader closed the pipe (or the file is gone).
#[derive(Debug)]
pub struct Closed(std::io::Error);

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot write to stdout: {}", self.0)
    }
}

impl std::error::Error for Closed {}

impl Closed {
    /// Whether the reader went away (the quiet case), rather than, say, a full disk.
    pub fn is_broken_pipe(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}

/// Writes `args` to stdout.
pub fn stdout(args: fmt::Arguments<'_>) -> Result<(), Closed> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.flush())
        .map_err(Closed)
}

/// Writes `args` to stderr; an error is dropped.
pub fn stderr(args: fmt::Arguments<'_>) {
    let _ = std::io::stderr().lock().write_fmt(args);
}

/// `println!` that returns `Result<(), Closed>` instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::out::stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that returns `Result<(), Closed>` instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::stdout(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics: a line on stderr, or nothing if stderr is gone.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::out::stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}
