//! The `Manager`: every named connection of a configuration, connected and closed together.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;

use crate::config::{Config, DriverConfig};
use crate::context::Context;
use crate::error::{Error, Operation, Origin, Result};
use crate::memory::MemoryProvider;
use crate::provider::Provider;

/// How long the constructors that take no context wait for all connections.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Owns every named connection and hands out providers by name.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), broker::Error> {
/// use broker::{Context, Manager, Message};
///
/// let manager = Manager::from_toml(r#"
///     [brokers.events]
///     driver = "memory"
/// "#).await?;
///
/// let events = manager.get("events")?;
/// events.publish(&Context::new(), "orders", Message::new("hello")).await?;
/// manager.close().await?;
/// # Ok(())
/// # }
/// ```
pub struct Manager {
    providers: BTreeMap<String, Arc<dyn Provider>>,
}

impl Manager {
    /// Reads the configuration file at `path` (with environment overrides) and connects every
    /// connection in it.
    pub async fn from_file(path: impl AsRef<Path>) -> Result<Manager> {
        Manager::from_config(Config::from_file(path)?).await
    }

    /// Parses TOML text (with environment overrides) and connects every connection in it.
    pub async fn from_toml(text: &str) -> Result<Manager> {
        Manager::from_config(Config::from_toml(text)?).await
    }

    /// Connects every connection of `config`, waiting at most [`DEFAULT_CONNECT_TIMEOUT`].
    pub async fn from_config(config: Config) -> Result<Manager> {
        let ctx = Context::new().with_timeout(DEFAULT_CONNECT_TIMEOUT);
        Manager::connect(&ctx, config).await
    }

    /// Connects every connection of `config` within `ctx`.
    ///
    /// If any connection fails, the ones that did connect are closed again and the error names
    /// the connection that failed and why.
    pub async fn connect(ctx: &Context, config: Config) -> Result<Manager> {
        let attempts = config
            .brokers
            .into_iter()
            .map(|(name, settings)| async move {
                let connected = connect(ctx, &name, settings).await;
                (name, connected)
            });
        let results = join_all(attempts).await;

        let mut providers = BTreeMap::new();
        let mut first_error = None;
        for (name, connected) in results {
            match connected {
                Ok(provider) => {
                    tracing::info!(connection = %name, driver = %provider.driver(), "connected");
                    providers.insert(name, provider);
                }
                Err(error) => {
                    tracing::error!(connection = %name, error = %error, "cannot connect");
                    first_error.get_or_insert(error);
                }
            }
        }

        let manager = Manager { providers };
        if let Some(error) = first_error {
            // Best effort: the connect error is the one worth reporting.
            let _ = manager.close().await;
            return Err(error);
        }
        Ok(manager)
    }

    /// The connection named `name`.
    pub fn get(&self, name: &str) -> Result<Arc<dyn Provider>> {
        self.providers
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownConnection {
                name: name.to_owned(),
                known: self.providers.keys().cloned().collect(),
            })
    }

    /// The connection named `name` as its concrete driver type, to reach the native client.
    pub fn get_as<T: Provider>(&self, name: &str) -> Result<Arc<T>> {
        let provider = self.get(name)?;
        let actual = provider.driver();
        provider.downcast::<T>().map_err(|_| Error::WrongDriver {
            connection: name.to_owned(),
            expected: std::any::type_name::<T>(),
            actual,
        })
    }

    /// The names of every connection, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.providers.keys().map(String::as_str)
    }

    /// Pings every connection at once; the error names the first that failed.
    pub async fn ping(&self, ctx: &Context) -> Result<()> {
        let pings = self.providers.values().map(|provider| provider.ping(ctx));
        join_all(pings).await.into_iter().collect()
    }

    /// Closes every connection: subscriptions stop first and in-flight handlers finish.
    ///
    /// Every connection is closed even if one fails; the error names the first that did.
    pub async fn close(&self) -> Result<()> {
        let closes = self.providers.values().map(|provider| provider.close());
        join_all(closes).await.into_iter().collect()
    }
}

impl fmt::Debug for Manager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.providers.values().map(ToString::to_string))
            .finish()
    }
}

async fn connect(ctx: &Context, name: &str, settings: DriverConfig) -> Result<Arc<dyn Provider>> {
    let driver = settings.driver();
    match settings {
        DriverConfig::Memory(settings) => Ok(Arc::new(MemoryProvider::new(name, settings))),
        #[cfg(feature = "kafka")]
        DriverConfig::Kafka(settings) => Ok(Arc::new(
            crate::kafka::KafkaProvider::connect(ctx, name, settings).await?,
        )),
        #[cfg(feature = "nats")]
        DriverConfig::Nats(settings) => Ok(Arc::new(
            crate::nats::NatsProvider::connect(ctx, name, settings).await?,
        )),
        #[cfg(feature = "rabbitmq")]
        DriverConfig::RabbitMq(settings) => Ok(Arc::new(
            crate::rabbitmq::RabbitMqProvider::connect(ctx, name, settings).await?,
        )),
        // Reached only when a driver's feature is off.
        #[allow(unreachable_patterns)]
        _ => {
            let origin = || Origin::new(driver, name, Operation::Connect, "");
            ctx.check(origin)?;
            Err(Error::Unsupported {
                origin: origin(),
                reason: format!("this build was compiled without the `{driver}` feature"),
            })
        }
    }
}
