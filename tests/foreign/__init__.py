"""Someone else's rules: real rulesets (data/, sources in data/SOURCES.md) loaded with counters into fresh
network namespaces, then the legacy iptables driver applies, changes and flushes its own chains among them;
every foreign rule, chain, policy and counter must come through each step unchanged."""
