"""Ansible Vault, through ansible-core's own library: ``build.py fleet import-ansible --vault-password-file``.
The password stays on this machine; the server receives the decrypted values as secrets (over TLS) and stores
them encrypted. ansible-core is optional (``pip install 'vv-ota[ansible]'``): without it, a vault is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ota_common.ansible_inventory import Decrypt, InventoryError
from ota_common.errors import UserError

INSTALL_HINT = "install ansible-core (pip install 'ansible-core>=2.15', or scripts/install.sh)"


def vault_decrypt(password_file: Path) -> Decrypt:
    """A function that decrypts vault text (a ``!vault`` value or a whole file) with the password in
    ``password_file`` (an executable file is run, as Ansible does). Raises UserError when ansible-core is not
    installed or the password cannot be read; the function raises InventoryError for a wrong password."""
    try:
        from ansible.errors import AnsibleError
        from ansible.parsing.dataloader import DataLoader
        from ansible.parsing.vault import VaultLib, get_file_vault_secret
    except ImportError:
        raise UserError(f"vault-encrypted inventories need ansible-core's vault library: {INSTALL_HINT}") from None
    try:
        secret: Any = get_file_vault_secret(filename=str(password_file), vault_id="default", loader=DataLoader())
        secret.load()
    except AnsibleError as e:
        raise UserError(f"cannot read the vault password from {password_file}: {str(e).splitlines()[0]}") from None
    vault = VaultLib([("default", secret)])

    def decrypt(text: str) -> str:
        try:
            plain = vault.decrypt(text.strip().encode())
        except AnsibleError as e:
            raise InventoryError(f"cannot decrypt the vault text: {str(e).splitlines()[0]}") from None
        try:
            return bytes(plain).decode()
        except UnicodeDecodeError:
            raise InventoryError("the vault text decrypts to something that is not UTF-8 text") from None

    return decrypt
