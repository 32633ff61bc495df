// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

/// @title LeaseEscrow
/// @notice Holds renters' deposits for gpupool leases and pays providers by the second.
///
/// Storage holds one word per lease: the hash of its current state (or CLOSED).
/// Callers pass the state itself, which every event lets anyone rebuild, and the
/// contract checks it against the hash. A lease's whole life (open, one withdraw,
/// close) then costs about a third of the gas that storing the struct would, and a
/// caller acting on a state that someone else has just changed gets `StaleLease`
/// instead of a surprise.
///
/// Members also keep an account here per token. Leases are paid into accounts and
/// opened from them, and tokens cross the token contract only on `deposit`,
/// `withdrawFunds`, and an open whose account falls short. An ERC-20 transfer costs
/// three to four times an account update, and a member who both rents and lends
/// keeps one balance moving inside the escrow; a lease's whole life (open, one
/// withdraw, close) then costs about 141k gas.
///
/// A renter without a cluster of its own can mandate a member's operator as its
/// agent: `approveAgent` caps what the agent may commit from the renter's account,
/// `openFor` opens a lease funded from that account with the agent recorded in the
/// lease, and the agent may then top it up from that account, within the same
/// allowance, and close it as the renter would. Refunds always go
/// to the renter's account, never to the agent.
///
/// Invariant: for every token, this contract's balance equals the sum of `balance`
/// over open leases in that token plus every account in that token. Fee-on-transfer
/// and rebasing tokens break it and are not supported.
contract LeaseEscrow is ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    /// The state of an open lease, as its hash was committed.
    struct Lease {
        /// Whose account funds the lease and gets the refund.
        address renter;
        /// Who may close the lease for the renter; zero when the renter opened it itself.
        address agent;
        address provider;
        IERC20 token;
        /// Tokens per second the provider earns while the lease is funded.
        uint128 ratePerSecond;
        /// Tokens held for this lease, including `owed`.
        uint128 balance;
        /// Accrued to the provider and not yet paid; never more than `balance`.
        uint128 owed;
        /// Accrual up to this time is already folded into `owed`.
        uint64 settledAt;
    }

    enum CloseReason {
        Completed,
        RenterCancelled,
        ProviderFailed,
        InsufficientFunds
    }

    /// Marks a closed lease, so that its id can never be opened again.
    bytes32 public constant CLOSED = bytes32(uint256(1));

    /// Lease id => keccak256(abi.encode(Lease)) while open, CLOSED after, 0 if never opened.
    mapping(bytes32 leaseId => bytes32 stateHash) public leaseHash;

    /// Owner => token => tokens the owner may open leases from or withdraw.
    mapping(address owner => mapping(IERC20 token => uint256 amount)) public accounts;

    /// Renter => agent => token => tokens the agent may still commit from the renter's account.
    mapping(address renter => mapping(address agent => mapping(IERC20 token => uint256 amount))) public agentAllowance;

    event Deposited(address indexed owner, IERC20 indexed token, uint256 amount, uint256 balance);
    event FundsWithdrawn(address indexed owner, IERC20 indexed token, address to, uint256 amount, uint256 balance);
    event LeaseOpened(
        bytes32 indexed leaseId,
        address indexed renter,
        address indexed provider,
        address agent,
        IERC20 token,
        uint256 ratePerSecond,
        uint256 deposit,
        uint256 startedAt,
        uint256 fromAccount
    );
    event AgentApproved(address indexed renter, address indexed agent, IERC20 indexed token, uint256 amount);
    event LeaseWithdrawn(bytes32 indexed leaseId, uint256 amount, uint256 balance, uint256 settledAt);
    event LeaseToppedUp(
        bytes32 indexed leaseId, uint256 amount, uint256 balance, uint256 owed, uint256 settledAt, uint256 fromAccount
    );
    event LeaseClosed(
        bytes32 indexed leaseId, CloseReason reason, address closedBy, uint256 paid, uint256 refunded
    );

    error InvalidLeaseId();
    error InvalidProvider();
    error InvalidToken();
    error ZeroRate();
    error ZeroAmount();
    error LeaseExists(bytes32 leaseId);
    error UnknownLease(bytes32 leaseId);
    error LeaseIsClosed(bytes32 leaseId);
    error StaleLease(bytes32 leaseId);
    error NotRenter();
    error NotProvider();
    error NotParty();
    error ReasonNotAllowed(CloseReason reason);
    error NotOverdrawn(bytes32 leaseId);
    error InsufficientAccount(uint256 available, uint256 requested);
    error InvalidRecipient();
    error InvalidAgent();
    error InsufficientAgentAllowance(uint256 available, uint256 requested);

    /// @notice Moves tokens from the caller's wallet into its account here.
    function deposit(IERC20 token, uint256 amount) external nonReentrant {
        if (address(token) == address(0)) revert InvalidToken();
        if (amount == 0) revert ZeroAmount();
        uint256 balance = accounts[msg.sender][token] + amount;
        accounts[msg.sender][token] = balance;
        emit Deposited(msg.sender, token, amount, balance);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice Sends `amount` from the caller's account to `to`.
    function withdrawFunds(IERC20 token, uint256 amount, address to) external nonReentrant {
        if (amount == 0) revert ZeroAmount();
        // Sent to the escrow itself, tokens would sit outside every account and lease.
        if (to == address(0) || to == address(this)) revert InvalidRecipient();
        uint256 available = accounts[msg.sender][token];
        if (amount > available) revert InsufficientAccount(available, amount);
        uint256 balance = available - amount;
        accounts[msg.sender][token] = balance;
        emit FundsWithdrawn(msg.sender, token, to, amount, balance);
        token.safeTransfer(to, amount);
    }

    /// @notice Opens a lease funded with `amount` from the caller, who becomes its
    /// renter: from its account as far as that goes, the rest from its wallet.
    /// @dev Renters derive `leaseId` from their order, so retrying an open whose
    /// receipt was lost can only ever hit `LeaseExists`, never open a second lease.
    function open(bytes32 leaseId, address provider, IERC20 token, uint128 ratePerSecond, uint128 amount)
        external
        nonReentrant
        returns (Lease memory lease)
    {
        lease = _open(leaseId, msg.sender, address(0), provider, token, ratePerSecond, amount);
        uint256 fromAccount = _debit(msg.sender, token, amount);
        _opened(leaseId, lease, fromAccount);
        if (amount > fromAccount) token.safeTransferFrom(msg.sender, address(this), amount - fromAccount);
    }

    /// @notice Lets `agent` open leases funded from the caller's account, up to
    /// `amount` tokens in all (not restored by refunds), and close them for the
    /// caller. Setting zero revokes further opens; leases already open keep their agent.
    function approveAgent(address agent, IERC20 token, uint256 amount) external {
        if (agent == address(0) || agent == msg.sender) revert InvalidAgent();
        if (address(token) == address(0)) revert InvalidToken();
        agentAllowance[msg.sender][agent][token] = amount;
        emit AgentApproved(msg.sender, agent, token, amount);
    }

    /// @notice Opens a lease for `renter`, funded from the renter's account only
    /// (never its wallet), with the caller as the lease's agent.
    function openFor(
        address renter,
        bytes32 leaseId,
        address provider,
        IERC20 token,
        uint128 ratePerSecond,
        uint128 amount
    ) external nonReentrant returns (Lease memory lease) {
        if (renter == address(0) || renter == msg.sender) revert InvalidAgent();
        // An agent who is also the provider would pay itself from the renter's funds.
        if (provider == msg.sender) revert InvalidProvider();
        lease = _open(leaseId, renter, msg.sender, provider, token, ratePerSecond, amount);
        _spendAsAgent(renter, token, amount);
        _opened(leaseId, lease, amount);
    }

    /// @notice Pays the provider what has accrued so far, into its account.
    function withdraw(bytes32 leaseId, Lease calldata current) external nonReentrant returns (uint256 amount) {
        _check(leaseId, current);
        if (msg.sender != current.provider) revert NotProvider();

        Lease memory lease = _accrue(current);
        amount = lease.owed;
        lease.balance -= lease.owed;
        lease.owed = 0;
        leaseHash[leaseId] = keccak256(abi.encode(lease));
        emit LeaseWithdrawn(leaseId, amount, lease.balance, lease.settledAt);
        if (amount > 0) accounts[lease.provider][lease.token] += amount;
    }

    /// @notice Adds funds. From the renter: its account as far as that goes, the
    /// rest from its wallet. From the lease's agent: the renter's account only,
    /// within what the renter allows that agent (as `openFor`), so that a job
    /// longer than its first deposit keeps running without the renter online.
    /// Time during which the lease was out of funds is not charged afterwards:
    /// accrual is folded in first, and it had stopped at the balance.
    function topUp(bytes32 leaseId, Lease calldata current, uint128 amount) external nonReentrant {
        _check(leaseId, current);
        bool byAgent = current.agent != address(0) && msg.sender == current.agent;
        if (msg.sender != current.renter && !byAgent) revert NotRenter();
        if (amount == 0) revert ZeroAmount();

        Lease memory lease = _accrue(current);
        lease.balance += amount;
        leaseHash[leaseId] = keccak256(abi.encode(lease));
        uint256 fromAccount;
        if (byAgent) {
            _spendAsAgent(lease.renter, lease.token, amount);
            fromAccount = amount;
        } else {
            fromAccount = _debit(msg.sender, lease.token, amount);
        }
        emit LeaseToppedUp(leaseId, amount, lease.balance, lease.owed, lease.settledAt, fromAccount);
        if (amount > fromAccount) lease.token.safeTransferFrom(msg.sender, address(this), amount - fromAccount);
    }

    /// @notice Closes the lease: the provider's account gets what has accrued (never
    /// more than the balance) and the renter's account the rest.
    /// @dev Only the renter may say it cancelled; `InsufficientFunds` needs the lease
    /// to have run out, so neither side can use it to end a funded lease early.
    function close(bytes32 leaseId, Lease calldata current, CloseReason reason)
        external
        nonReentrant
        returns (uint256 paid, uint256 refunded)
    {
        _check(leaseId, current);
        bool forRenter = msg.sender == current.renter || (current.agent != address(0) && msg.sender == current.agent);
        if (!forRenter && msg.sender != current.provider) revert NotParty();
        if (reason == CloseReason.RenterCancelled && !forRenter) revert ReasonNotAllowed(reason);

        Lease memory lease = _accrue(current);
        if (reason == CloseReason.InsufficientFunds && lease.owed < lease.balance) revert NotOverdrawn(leaseId);
        paid = lease.owed;
        refunded = lease.balance - lease.owed;
        leaseHash[leaseId] = CLOSED;
        emit LeaseClosed(leaseId, reason, msg.sender, paid, refunded);
        if (paid > 0) accounts[lease.provider][lease.token] += paid;
        if (refunded > 0) accounts[lease.renter][lease.token] += refunded;
    }

    /// @notice What the lease owes its provider at `timestamp`, and whether it has run out.
    function accruedAt(Lease calldata lease, uint64 timestamp) external pure returns (uint256 owed, bool overdrawn) {
        uint256 elapsed = timestamp > lease.settledAt ? timestamp - lease.settledAt : 0;
        owed = _owedAfter(lease, elapsed);
        overdrawn = owed == lease.balance;
    }

    /// @notice The hash `leaseHash` holds for `lease`; clients compare it to check the state they rebuilt.
    function hashLease(Lease calldata lease) external pure returns (bytes32) {
        return keccak256(abi.encode(lease));
    }

    /// Checks an open's terms and commits the lease's hash.
    function _open(
        bytes32 leaseId,
        address renter,
        address agent,
        address provider,
        IERC20 token,
        uint128 ratePerSecond,
        uint128 amount
    ) private returns (Lease memory lease) {
        if (leaseId == bytes32(0) || leaseId == CLOSED) revert InvalidLeaseId();
        if (provider == address(0) || provider == renter) revert InvalidProvider();
        if (address(token) == address(0)) revert InvalidToken();
        if (ratePerSecond == 0) revert ZeroRate();
        if (amount == 0) revert ZeroAmount();
        if (leaseHash[leaseId] != bytes32(0)) revert LeaseExists(leaseId);
        lease = Lease({
            renter: renter,
            agent: agent,
            provider: provider,
            token: token,
            ratePerSecond: ratePerSecond,
            balance: amount,
            owed: 0,
            settledAt: uint64(block.timestamp)
        });
        leaseHash[leaseId] = keccak256(abi.encode(lease));
    }

    function _opened(bytes32 leaseId, Lease memory lease, uint256 fromAccount) private {
        emit LeaseOpened(
            leaseId,
            lease.renter,
            lease.provider,
            lease.agent,
            lease.token,
            lease.ratePerSecond,
            lease.balance,
            block.timestamp,
            fromAccount
        );
    }

    /// Takes `amount` from `renter`'s account for the calling agent, within the
    /// renter's allowance for it; all of it, or nothing.
    function _spendAsAgent(address renter, IERC20 token, uint256 amount) private {
        uint256 allowed = agentAllowance[renter][msg.sender][token];
        if (amount > allowed) revert InsufficientAgentAllowance(allowed, amount);
        uint256 available = accounts[renter][token];
        if (amount > available) revert InsufficientAccount(available, amount);
        agentAllowance[renter][msg.sender][token] = allowed - amount;
        accounts[renter][token] = available - amount;
    }

    /// Takes up to `amount` from `owner`'s account; returns how much it took.
    function _debit(address owner, IERC20 token, uint256 amount) private returns (uint256 taken) {
        uint256 available = accounts[owner][token];
        taken = amount < available ? amount : available;
        if (taken > 0) accounts[owner][token] = available - taken;
    }

    function _check(bytes32 leaseId, Lease calldata current) private view {
        bytes32 stored = leaseHash[leaseId];
        if (stored == bytes32(0)) revert UnknownLease(leaseId);
        if (stored == CLOSED) revert LeaseIsClosed(leaseId);
        if (keccak256(abi.encode(current)) != stored) revert StaleLease(leaseId);
    }

    function _accrue(Lease calldata current) private view returns (Lease memory lease) {
        lease = current;
        lease.owed = uint128(_owedAfter(current, block.timestamp - current.settledAt));
        lease.settledAt = uint64(block.timestamp);
    }

    /// Accrual stops at the balance: an overdrawn lease owes exactly its balance.
    function _owedAfter(Lease calldata lease, uint256 elapsed) private pure returns (uint256) {
        uint256 owed = uint256(lease.owed) + uint256(lease.ratePerSecond) * elapsed;
        return owed < lease.balance ? owed : lease.balance;
    }
}
