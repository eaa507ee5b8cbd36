"""access-log checkpoints chained: the previous checkpoint's hash and the entry count

Revision ID: 0007
Revises: 0006

Existing checkpoints keep NULL in both columns and verify as before; the first
checkpoint written after this migration links to the newest of them and starts the chain.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("access_log_checkpoints") as batch:
        batch.add_column(sa.Column("prev_hash", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("entry_count", sa.Integer(), nullable=True))
        batch.create_unique_constraint("uq_access_log_checkpoints_prev_hash", ["prev_hash"])


def downgrade() -> None:
    with op.batch_alter_table("access_log_checkpoints") as batch:
        batch.drop_constraint("uq_access_log_checkpoints_prev_hash", type_="unique")
        batch.drop_column("entry_count")
        batch.drop_column("prev_hash")
