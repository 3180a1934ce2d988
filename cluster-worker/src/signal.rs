//! `SIGTERM` as an event of the control loop: a self-pipe written by a signal-hook action.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use signal_hook::SigId;
use signal_hook::consts::SIGTERM;

use crate::Error;
use crate::state::lock;

/// Once `SIGTERM` handling is installed, the process no longer dies of it by default. While
/// no worker loop listens, this flag makes the signal do its default (terminate) again.
static TERMINATE_BY_DEFAULT: AtomicBool = AtomicBool::new(true);

/// How many control loops listen for `SIGTERM`, and whether the fallback action exists.
static REGISTRATIONS: Mutex<(usize, bool)> = Mutex::new((0, false));

/// The read end of a pipe that receives a byte for every `SIGTERM` (coalesced).
#[derive(Debug)]
pub(crate) struct SigtermPipe {
    id: SigId,
    reader: mio::net::UnixStream,
}

impl SigtermPipe {
    pub(crate) fn register() -> Result<SigtermPipe, Error> {
        let (reader, writer) =
            UnixStream::pair().map_err(|err| Error::io("socketpair (signal pipe)", err))?;
        reader
            .set_nonblocking(true)
            .map_err(|err| Error::io("fcntl(O_NONBLOCK)", err))?;
        let mut registrations = lock(&REGISTRATIONS);
        if !registrations.1 {
            signal_hook::flag::register_conditional_default(SIGTERM, &TERMINATE_BY_DEFAULT)
                .map_err(|err| Error::io("sigaction(SIGTERM)", err))?;
            registrations.1 = true;
        }
        let id = signal_hook::low_level::pipe::register(SIGTERM, writer)
            .map_err(|err| Error::io("sigaction(SIGTERM)", err))?;
        registrations.0 += 1;
        TERMINATE_BY_DEFAULT.store(false, Ordering::SeqCst);
        Ok(SigtermPipe {
            id,
            reader: mio::net::UnixStream::from_std(reader),
        })
    }

    pub(crate) fn source(&mut self) -> &mut mio::net::UnixStream {
        &mut self.reader
    }

    /// Empties the pipe; true if a signal had arrived.
    pub(crate) fn drain(&mut self) -> bool {
        let mut buf = [0u8; 64];
        let mut arrived = false;
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return arrived,
                Ok(_) => arrived = true,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return arrived,
            }
        }
    }
}

impl Drop for SigtermPipe {
    fn drop(&mut self) {
        let mut registrations = lock(&REGISTRATIONS);
        // Closes the write end, which the action owns.
        signal_hook::low_level::unregister(self.id);
        registrations.0 = registrations.0.saturating_sub(1);
        if registrations.0 == 0 {
            TERMINATE_BY_DEFAULT.store(true, Ordering::SeqCst);
        }
    }
}
