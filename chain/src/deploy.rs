//! Deploying the contracts and funding wallets: what the test environment and the
//! demo do to a fresh chain. Production pools point at contracts deployed once.

use alloy::{
    network::EthereumWallet,
    primitives::{Address, U256},
    providers::{Provider, ProviderBuilder},
};

use crate::{
    bindings::{GpuToken, LeaseEscrow},
    config::ChainConfig,
    error::ChainError,
    wallet::Wallet,
};

/// Deploys the token (owned by `deployer`) and the escrow.
pub async fn deploy(rpc_url: &str, deployer: &Wallet) -> Result<ChainConfig, ChainError> {
    crate::ensure_crypto_provider();
    let url =
        reqwest::Url::parse(rpc_url).map_err(|e| ChainError::Config(format!("the RPC URL does not parse: {e}")))?;
    let provider = ProviderBuilder::new()
        .wallet(EthereumWallet::from(deployer.signer()))
        .connect_http(url);
    let failed = |what: &'static str| {
        move |e: alloy::contract::Error| ChainError::Rpc {
            during: what,
            detail: e.to_string(),
        }
    };
    let chain_id = provider.get_chain_id().await.map_err(|e| ChainError::Rpc {
        during: "eth_chainId",
        detail: e.to_string(),
    })?;
    let from_block = provider.get_block_number().await.map_err(|e| ChainError::Rpc {
        during: "eth_blockNumber",
        detail: e.to_string(),
    })?;
    let token = GpuToken::deploy(&provider, deployer.address())
        .await
        .map_err(failed("deploy GpuToken"))?;
    let escrow = LeaseEscrow::deploy(&provider)
        .await
        .map_err(failed("deploy LeaseEscrow"))?;
    Ok(ChainConfig {
        rpc_url: rpc_url.to_string(),
        chain_id,
        escrow: *escrow.address(),
        token: *token.address(),
        from_block,
    })
}

/// Mints dev tokens; `owner` must own the token.
pub async fn mint(config: &ChainConfig, owner: &Wallet, to: Address, amount: u128) -> Result<(), ChainError> {
    crate::ensure_crypto_provider();
    let url = reqwest::Url::parse(&config.rpc_url)
        .map_err(|e| ChainError::Config(format!("the RPC URL does not parse: {e}")))?;
    let provider = ProviderBuilder::new()
        .wallet(EthereumWallet::from(owner.signer()))
        .connect_http(url);
    let token = GpuToken::new(config.token, &provider);
    token
        .mint(to, U256::from(amount))
        .send()
        .await
        .map_err(|e| ChainError::Rpc {
            during: "mint",
            detail: e.to_string(),
        })?
        .get_receipt()
        .await
        .map_err(|e| ChainError::Rpc {
            during: "mint receipt",
            detail: e.to_string(),
        })?;
    Ok(())
}
