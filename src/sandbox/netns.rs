//! Network namespaces for isolated sandboxes, and sockets made inside them.
//!
//! Each isolated sandbox gets a network namespace of its own with loopback only. The gateway
//! creates it (on a short-lived thread of its own, so no thread that serves anything ever
//! changes namespace for long) and holds its file descriptor for the sandbox's life: the
//! launcher joins it through `/proc/<gateway>/fd/<n>`, and the proxy makes upstream sockets
//! inside it. A socket keeps the namespace it was made in, so a thread can step in, make the
//! socket, step back out, and then connect or accept on the host side as with any socket
//! (ISOLATION.md: about 5 µs per connection). Nothing listens on a host interface for a
//! sandbox, and from inside nothing outside is reachable: there is no route out.
//!
//! Holding the descriptor (never a pid) means a recycled pid can never misroute a connection;
//! dropping it (with every process inside gone) frees the namespace.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::OnceLock;

use nix::sched::{setns, unshare, CloneFlags};

/// A sandbox's network namespace, held open.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
}

/// The gateway's own network namespace, to step back into after making a socket elsewhere.
static HOME: OnceLock<io::Result<OwnedFd>> = OnceLock::new();

/// Opens the gateway's own namespace once. Call it at start-up, before any thread steps
/// anywhere (the first call records whichever namespace the calling thread is in).
pub fn init_home() -> io::Result<()> {
    home().map(|_| ())
}

fn home() -> io::Result<&'static OwnedFd> {
    HOME.get_or_init(|| std::fs::File::open("/proc/thread-self/ns/net").map(OwnedFd::from))
        .as_ref()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open this process's network namespace: {e}"),
            )
        })
}

impl NetNs {
    /// A fresh namespace with loopback up, plus a listening socket on `127.0.0.1:<port>` inside
    /// it for each port in `listen` (the egress proxy's). Made on a thread of its own that
    /// exits afterwards, so the caller's thread never changes namespace.
    pub fn create(listen: &[u16]) -> io::Result<(NetNs, Vec<std::net::TcpListener>)> {
        home()?;
        let listen = listen.to_vec();
        std::thread::Builder::new()
            .name("sandgate-netns".into())
            .spawn(move || -> io::Result<(NetNs, Vec<std::net::TcpListener>)> {
                unshare(CloneFlags::CLONE_NEWNET).map_err(|e| {
                    io::Error::other(format!(
                        "cannot create a network namespace (needs root or CAP_SYS_ADMIN): {e}"
                    ))
                })?;
                let fd = OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net")?);
                loopback_up()?;
                let mut listeners = Vec::with_capacity(listen.len());
                for port in listen {
                    let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
                    let l = std::net::TcpListener::bind(addr)?;
                    l.set_nonblocking(true)?;
                    listeners.push(l);
                }
                Ok((NetNs { fd }, listeners))
            })?
            .join()
            .map_err(|_| io::Error::other("the namespace thread panicked"))?
    }

    /// The path by which a child of this process can open the namespace (it must run as root).
    pub fn proc_path(&self) -> String {
        format!("/proc/{}/fd/{}", std::process::id(), self.fd.as_raw_fd())
    }

    /// Runs `make` (which must not block or yield) with the calling thread inside this
    /// namespace, then steps back. Sockets made in `make` stay in this namespace.
    ///
    /// If stepping back fails the thread would go on serving from a sandbox's namespace, so
    /// the process aborts instead: that cannot happen while the home descriptor is open.
    pub fn within<T>(&self, make: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let home = home()?;
        setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
            io::Error::other(format!("cannot enter the sandbox's network namespace: {e}"))
        })?;
        let made = make();
        if let Err(e) = setns(home.as_fd(), CloneFlags::CLONE_NEWNET) {
            tracing::error!(error = %e, "cannot return to the gateway's network namespace; aborting");
            std::process::abort();
        }
        made
    }

    /// Connects to `127.0.0.1:port` inside the namespace.
    pub async fn connect(&self, port: u16) -> io::Result<tokio::net::TcpStream> {
        let socket = self.within(tokio::net::TcpSocket::new_v4)?;
        socket.set_nodelay(true)?;
        socket
            .connect(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)))
            .await
    }
}

/// Brings `lo` up in the calling thread's (new) network namespace: one `RTM_NEWLINK` netlink
/// request setting `IFF_UP` on interface 1, which is always `lo` in a new namespace. Written
/// out here (32 bytes) rather than pulling a netlink stack or forking `ip link set lo up`.
fn loopback_up() -> io::Result<()> {
    use nix::sys::socket::{
        recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
    };
    const RTM_NEWLINK: u16 = 16;
    const NLM_F_REQUEST: u16 = 0x1;
    const NLM_F_ACK: u16 = 0x4;
    const NLMSG_ERROR: u16 = 2;
    const IFF_UP: u32 = 0x1;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )
    .map_err(io::Error::from)?;
    nix::sys::socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(io::Error::from)?;
    let mut msg = Vec::with_capacity(32);
    // struct nlmsghdr { len, type, flags, seq, pid }
    msg.extend_from_slice(&32u32.to_ne_bytes());
    msg.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // struct ifinfomsg { family: u8, pad: u8, type: u16, index: i32, flags: u32, change: u32 }
    msg.extend_from_slice(&[0u8, 0u8]);
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&1i32.to_ne_bytes());
    msg.extend_from_slice(&IFF_UP.to_ne_bytes());
    msg.extend_from_slice(&IFF_UP.to_ne_bytes());
    send(fd.as_raw_fd(), &msg, MsgFlags::empty()).map_err(io::Error::from)?;
    let mut answer = [0u8; 256];
    let n = recv(fd.as_raw_fd(), &mut answer, MsgFlags::empty()).map_err(io::Error::from)?;
    // The ack is an NLMSG_ERROR whose error field (after the 16-byte header) is 0.
    let kind = answer.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let errno = answer
        .get(16..20)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    match (n >= 20, kind, errno) {
        (true, Some(NLMSG_ERROR), Some(0)) => Ok(()),
        (true, Some(NLMSG_ERROR), Some(e)) => Err(io::Error::from_raw_os_error(-e)),
        _ => Err(io::Error::other(
            "unexpected netlink answer bringing up loopback",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_socket_made_inside_reaches_only_what_listens_inside() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        // A listener on the host's loopback: unreachable from the namespace.
        let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host_port = host.local_addr().unwrap().port();
        let (ns, mut listeners) = NetNs::create(&[0]).unwrap();
        let inside = tokio::net::TcpListener::from_std(listeners.remove(0)).unwrap();
        let port = inside.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = inside.accept().await.unwrap();
            s.write_all(b"hello from inside").await.unwrap();
        });
        let mut c = ns.connect(port).await.unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello from inside");
        server.await.unwrap();
        // The host's listener is not there, and the inside one is not on the host.
        assert!(ns.connect(host_port).await.is_err());
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
                || port == host_port
        );
        // This thread is back home: the host listener answers.
        assert!(tokio::net::TcpStream::connect(("127.0.0.1", host_port))
            .await
            .is_ok());
    }
}
