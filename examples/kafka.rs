//! Kafka through the common interface, then through the native rskafka client: a consumer
//! group handles orders keyed by customer, and the escape hatch reads where each record landed.
//!
//! ```text
//! scripts/brokers                    # or any Kafka on 127.0.0.1:9092
//! cargo run --example kafka          # KAFKA_BROKERS overrides 127.0.0.1:9092
//! ```

use std::sync::Arc;
use std::time::Duration;

use broker::kafka::{KEY_HEADER, KafkaProvider, partition_for_key};
use broker::{Context, Manager, Message, ProviderExt};
use rskafka::client::partition::OffsetAt;
use tokio::sync::Semaphore;

const ORDERS: usize = 6;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
    let topic = format!("example.orders.{}", std::process::id());
    let manager = Manager::from_toml(&format!(
        r#"
        [brokers.orders]
        driver = "kafka"

        [brokers.orders.kafka]
        brokers = ["{brokers}"]
        group_id = "billing"
        partitions = 3
        start_offset = "earliest"
        "#
    ))
    .await?;
    let orders = manager.get("orders")?;

    // Every order is handled once by the `billing` group, in order per customer.
    let handled = Arc::new(Semaphore::new(0));
    let done = Arc::clone(&handled);
    let billing = orders
        .subscribe_fn(
            &Context::new(),
            &topic,
            move |ctx: Context, message: Message| {
                let done = Arc::clone(&done);
                async move {
                    tracing::info!(
                        customer = message.header(KEY_HEADER),
                        body = %String::from_utf8_lossy(&message.body),
                        trace_id = ctx.trace_id(),
                        "billed"
                    );
                    done.add_permits(1);
                    Ok::<(), broker::Error>(())
                }
            },
        )
        .await?;

    let ctx = Context::new().with_timeout(Duration::from_secs(10));
    for index in 0..ORDERS {
        let customer = format!("customer-{}", index % 3);
        let order = Message::new(format!("order {index}")).with_header(KEY_HEADER, &customer);
        orders.publish(&ctx, &topic, order).await?;
    }
    let _all = handled.acquire_many(ORDERS as u32).await?;
    billing.stop().await;

    // The escape hatch: rskafka's own clients, for what the common interface does not cover.
    let kafka: Arc<KafkaProvider> = manager.get_as("orders")?;
    for partition in 0..3 {
        let client = kafka.partition_client(&topic, partition).await?;
        let end = client.get_offset(OffsetAt::Latest).await?;
        let customers: Vec<String> = (0..3)
            .map(|n| format!("customer-{n}"))
            .filter(|customer| partition_for_key(customer.as_bytes(), 3) == partition)
            .collect();
        tracing::info!(partition, records = end, ?customers, "partition");
    }
    let topics = kafka.client().list_topics().await?;
    tracing::info!(topics = topics.len(), "topics in the cluster");

    manager.close().await?;
    Ok(())
}
