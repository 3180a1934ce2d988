//! One `mio` event source implementation for every type whose readiness is one fd's.

/// Implements [`mio::event::Source`] for a type by registering the fd that an expression of
/// the value names: a channel's socket, a listener's readiness fd, a stream's socket. The
/// expression gets the value as `&Self` under the name given, and must give something that
/// implements `AsRawFd` (an `OwnedFd`, a `BorrowedFd`, a `TcpStream`, ...).
///
/// ```
/// use std::os::fd::OwnedFd;
///
/// struct Pipe {
///     reader: OwnedFd,
/// }
///
/// cluster_ipc::impl_fd_source!(Pipe, |pipe| pipe.reader);
///
/// # fn main() -> std::io::Result<()> {
/// let (reader, _writer) = std::io::pipe()?;
/// let mut pipe = Pipe { reader: reader.into() };
/// let poll = mio::Poll::new()?;
/// poll.registry().register(&mut pipe, mio::Token(0), mio::Interest::READABLE)?;
/// # Ok(())
/// # }
/// ```
///
/// Generic types name their parameters first:
/// `impl_fd_source!(for<P> Channel<P>, |channel| channel.sock)`.
#[macro_export]
macro_rules! impl_fd_source {
    (for<$($generic:ident),*> $type:ty, |$this:ident| $fd:expr) => {
        impl<$($generic),*> $crate::__mio::event::Source for $type {
            fn register(
                &mut self,
                registry: &$crate::__mio::Registry,
                token: $crate::__mio::Token,
                interests: $crate::__mio::Interest,
            ) -> ::std::io::Result<()> {
                let $this = &*self;
                let fd = ::std::os::fd::AsRawFd::as_raw_fd(&$fd);
                $crate::__mio::unix::SourceFd(&fd).register(registry, token, interests)
            }

            fn reregister(
                &mut self,
                registry: &$crate::__mio::Registry,
                token: $crate::__mio::Token,
                interests: $crate::__mio::Interest,
            ) -> ::std::io::Result<()> {
                let $this = &*self;
                let fd = ::std::os::fd::AsRawFd::as_raw_fd(&$fd);
                $crate::__mio::unix::SourceFd(&fd).reregister(registry, token, interests)
            }

            fn deregister(&mut self, registry: &$crate::__mio::Registry) -> ::std::io::Result<()> {
                let $this = &*self;
                let fd = ::std::os::fd::AsRawFd::as_raw_fd(&$fd);
                $crate::__mio::unix::SourceFd(&fd).deregister(registry)
            }
        }
    };
    ($type:ty, |$this:ident| $fd:expr) => {
        $crate::impl_fd_source!(for<> $type, |$this| $fd);
    };
}
