# The daemon's container image, for deploy/lb-xdp.yaml:
#   docker build -t <registry>/lb-xdp:<tag> .
# The build stage installs what building needs (scripts/setup --build-only: the two Rust
# toolchains and bpf-linker); the image holds the binary alone, its eBPF programs embedded.
FROM debian:12 AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates curl gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# rustup-init itself, from the Rust distribution server (what sh.rustup.rs fetches too).
RUN curl --proto '=https' --tlsv1.2 -sSf -o /tmp/rustup-init \
        "https://static.rust-lang.org/rustup/dist/$(uname -m)-unknown-linux-gnu/rustup-init" \
    && chmod +x /tmp/rustup-init \
    && /tmp/rustup-init -y --profile minimal --default-toolchain none \
    && rm /tmp/rustup-init
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY . .
RUN scripts/setup --build-only \
    && cargo build --release --locked --package lb-user --bin lb-user

FROM debian:12-slim
COPY --from=build /src/target/release/lb-user /usr/local/bin/lb-user
ENTRYPOINT ["/usr/local/bin/lb-user"]
