"""Virtual keys and the spend ledger (issue 16). Open the store with
`await KeyStore.open(config.database.effective_url())`, create a key with
`await store.create(KeySpec.parse(body))`; the secret is returned then and never again."""

from clawdbot.common.keystore.records import KeyNotFound, KeyRecord, KeySpec, allowed
from clawdbot.common.keystore.store import KeyStore, hash_secret

__all__ = ["KeyNotFound", "KeyRecord", "KeySpec", "KeyStore", "allowed", "hash_secret"]
