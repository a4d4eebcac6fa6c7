//! The floor: a Pingora 0.9 proxy that does nothing but forward (same server settings as the gateway:
//! one thread). Usage: bare <upstream host:port> <listen addr>
use async_trait::async_trait;
use pingora::prelude::*;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare {
    addr: String,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.addr.as_str(), false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let id = std::process::id();
    let conf = ServerConf {
        threads: 1,
        pid_file: format!("/tmp/bare-{id}.pid"),
        upgrade_sock: format!("/tmp/bare-{id}.sock"),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut proxy =
        pingora::proxy::http_proxy_service(&server.configuration, Bare { addr: args[1].clone() });
    proxy.add_tcp(&args[2]);
    server.add_service(proxy);
    server.run_forever();
}
