"""sign-in state: used one-time ids, failed sign-ins, dashboard sessions

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "one_time_ids",
        sa.Column("id_hash", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id_hash"),
    )
    op.create_index(op.f("ix_one_time_ids_expires_at"), "one_time_ids", ["expires_at"],
                    unique=False)
    op.create_table(
        "sign_in_failures",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user_key", sa.String(length=64), nullable=False),
        sa.Column("address_key", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_sign_in_failures_at"), "sign_in_failures", ["at"], unique=False)
    op.create_index("ix_sign_in_failures_user_key_at", "sign_in_failures",
                    ["user_key", "at"], unique=False)
    op.create_index("ix_sign_in_failures_address_key_at", "sign_in_failures",
                    ["address_key", "at"], unique=False)
    op.create_table(
        "dashboard_sessions",
        sa.Column("id_hash", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=256), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("issuer", sa.String(length=512), nullable=True),
        sa.Column("patient", sa.String(length=256), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id_hash"),
    )
    op.create_index(op.f("ix_dashboard_sessions_subject"), "dashboard_sessions", ["subject"],
                    unique=False)
    op.create_index(op.f("ix_dashboard_sessions_expires_at"), "dashboard_sessions",
                    ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_dashboard_sessions_expires_at"), table_name="dashboard_sessions")
    op.drop_index(op.f("ix_dashboard_sessions_subject"), table_name="dashboard_sessions")
    op.drop_table("dashboard_sessions")
    op.drop_index("ix_sign_in_failures_address_key_at", table_name="sign_in_failures")
    op.drop_index("ix_sign_in_failures_user_key_at", table_name="sign_in_failures")
    op.drop_index(op.f("ix_sign_in_failures_at"), table_name="sign_in_failures")
    op.drop_table("sign_in_failures")
    op.drop_index(op.f("ix_one_time_ids_expires_at"), table_name="one_time_ids")
    op.drop_table("one_time_ids")
