//! Signals, as the primary's API speaks of them: a type of this crate, so that no version of
//! a system-call crate leaks into the public API.

use std::fmt;

/// A Unix signal number, with the names operators know (`Signal::SIGTERM`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Signal(i32);

macro_rules! signals {
    ($($name:ident),* $(,)?) => {
        impl Signal {
            $(
                #[doc = concat!("`", stringify!($name), "`.")]
                pub const $name: Signal = Signal(libc::$name);
            )*

            /// The signal's name (`"SIGTERM"`), if it is one of those above.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $(libc::$name => Some(stringify!($name)),)*
                    _ => None,
                }
            }
        }
    };
}

signals!(
    SIGHUP, SIGINT, SIGQUIT, SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE, SIGKILL, SIGUSR1, SIGSEGV,
    SIGUSR2, SIGPIPE, SIGALRM, SIGTERM, SIGCHLD, SIGCONT, SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU,
    SIGXCPU, SIGXFSZ, SIGSYS,
);

impl Signal {
    /// The signal with this number. Any positive number is accepted (real-time signals have
    /// no name); the kernel refuses what it does not know when the signal is sent.
    pub const fn from_raw(number: i32) -> Signal {
        Signal(number)
    }

    /// The signal's number.
    pub const fn as_raw(self) -> i32 {
        self.0
    }

    /// True for the signals a process gets for its own fault (a bad memory access, an abort,
    /// an illegal instruction, ...), as opposed to one sent to it to stop it.
    pub const fn is_fault(self) -> bool {
        matches!(
            self.0,
            libc::SIGSEGV
                | libc::SIGBUS
                | libc::SIGILL
                | libc::SIGFPE
                | libc::SIGABRT
                | libc::SIGSYS
                | libc::SIGTRAP
                | libc::SIGXCPU
                | libc::SIGXFSZ
        )
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "signal {}", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_have_their_names() {
        assert_eq!(Signal::SIGTERM.to_string(), "SIGTERM");
        assert_eq!(Signal::from_raw(libc::SIGKILL), Signal::SIGKILL);
        assert_eq!(Signal::from_raw(40).to_string(), "signal 40");
    }
}
