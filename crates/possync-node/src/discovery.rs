//! Finding peers by mDNS/DNS-SD (SPEC section 4): this node announces
//! `_posplus-p2p._tcp` with TXT `id=<posId>` and dials every other terminal it resolves.
//!
//! Discovery is a hint, never authentication: whoever answers must still pass the secure
//! channel with the shop secret. mdns-sd runs its own thread; nothing here blocks the runtime.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::dialer;
use crate::shared::DiscoveryHandle;

/// The DNS-SD service type of possync (and of the seed's POSPlus terminals).
pub const SERVICE_TYPE: &str = "_posplus-p2p._tcp.local.";

/// Announces this node and dials the terminals it finds, until shutdown.
pub async fn run(node: DiscoveryHandle, peer_addr: Option<SocketAddr>, completion: Arc<Semaphore>) {
    let daemon = match ServiceDaemon::new() {
        Ok(daemon) => daemon,
        Err(err) => {
            warn!(%err, "mDNS discovery unavailable; use static peers");
            return;
        }
    };
    let own_id = node.pos_id.to_string();
    if let Some(address) = peer_addr {
        let host = format!(
            "possync-{}.local.",
            own_id.chars().filter(char::is_ascii_alphanumeric).take(32).collect::<String>()
        );
        let announced = ServiceInfo::new(
            SERVICE_TYPE,
            &own_id,
            &host,
            "",
            address.port(),
            &[("id", own_id.as_str())][..],
        )
        .map(ServiceInfo::enable_addr_auto)
        .and_then(|service| daemon.register(service));
        if let Err(err) = announced {
            warn!(%err, "could not announce this terminal by mDNS");
        }
    }
    let events = match daemon.browse(SERVICE_TYPE) {
        Ok(events) => events,
        Err(err) => {
            warn!(%err, "could not browse for peers by mDNS");
            return;
        }
    };
    let mut dialing: HashSet<String> = HashSet::new();
    let mut shutdown = node.shutdown.subscribe();
    loop {
        let event = tokio::select! {
            event = events.recv_async() => match event {
                Ok(event) => event,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
        let ServiceEvent::ServiceResolved(service) = event else { continue };
        let Some(peer_id) = service.txt_properties.get_property_val_str("id").map(str::to_string) else {
            continue;
        };
        if peer_id == own_id {
            continue;
        }
        let mut addresses: Vec<IpAddr> = service.addresses.iter().map(|scoped| scoped.to_ip_addr()).collect();
        addresses.sort_by_key(|ip| (ip.is_ipv6(), *ip));
        let Some(ip) = addresses.first() else { continue };
        let target = SocketAddr::new(*ip, service.port).to_string();
        if dialing.insert(target.clone()) {
            info!(%peer_id, %target, "discovered a terminal");
            tokio::spawn(dialer::dial_forever(node.dialers.clone(), target, Arc::clone(&completion)));
        } else {
            // Seen again: a dialer that gave up starts over (SPEC section 4).
            debug!(%peer_id, "terminal seen again");
            node.reconnect.notify_waiters();
        }
    }
    if let Ok(status) = daemon.shutdown() {
        let _ = status.recv_async().await;
    }
}
