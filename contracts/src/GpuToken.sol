// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title GpuToken
/// @notice An ERC-20 for development, tests and the demo. Production pools use
/// any ERC-20; the escrow does not depend on anything specific to this one.
contract GpuToken is ERC20, Ownable {
    constructor(address owner_) ERC20("gpupool Dev Token", "GPUT") Ownable(owner_) {}

    /// @notice The test environment funds each organisation's and renter's wallet.
    function mint(address to, uint256 amount) external onlyOwner {
        _mint(to, amount);
    }
}
